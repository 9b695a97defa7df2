"""Worker processes from a task that Airflow's CeleryExecutor runs: forked from a Celery (billiard)
prefork pool worker, where multiprocessing used to refuse to start any child."""

import os
import sys
import textwrap

import pytest

billiard = pytest.importorskip("billiard")  # Celery's own dependency: installed with the Celery provider

# A billiard pool worker forks the task process (as Airflow's supervisor does), which then starts a
# spawned decode pool and a DataLoader worker, as preprocess and streamed training do.
PROBE = textwrap.dedent(
    """
    import os, sys

    def task(_):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                from torch.utils.data import DataLoader
                from gender_tasks.data.parallel import allow_worker_processes, cpu_pool

                with cpu_pool(4, 2, 0) as pool:
                    assert type(pool).__name__ == "ProcessPoolExecutor"
                    assert list(pool.map(abs, [-1, -2, -3, -4])) == [1, 2, 3, 4]
                allow_worker_processes()
                assert [int(x) for x in DataLoader(list(range(5)), batch_size=None, num_workers=1)] == [0, 1, 2, 3, 4]
                code = 0
            except BaseException as exc:
                print("FAILED", type(exc).__name__, exc, flush=True)
            os._exit(code)
        return os.waitpid(pid, 0)[1]

    if __name__ == "__main__":
        import billiard

        with billiard.Pool(1) as pool:
            print("STATUS", pool.map(task, [0])[0], flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_task_forked_from_a_celery_pool_worker_can_start_worker_processes(tmp_path):
    import subprocess

    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=170,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
    assert "STATUS 0" in out.stdout, out.stdout + out.stderr[-3000:]
