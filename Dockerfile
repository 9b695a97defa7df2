# The project's Airflow image: the official Airflow 3 image plus the pinned requirements and the code.
# Built once by `docker compose build`; every Airflow service of docker-compose.yaml runs it (the
# compose file also mounts dags/, plugins/, include/ and gender_tasks/ over the baked-in copies, so
# code edits need no rebuild). The PyPI torch wheels carry CUDA: the same image trains on a GPU worker.
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11
FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}
# An ARG declared before FROM is not visible after it unless declared again.
ARG AIRFLOW_VERSION

COPY --chown=airflow:root requirements.txt /opt/airflow/requirements.txt
# Pin Airflow itself to the base image's version so pip never up- or downgrades it.
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -r /opt/airflow/requirements.txt

COPY --chown=airflow:root gender_tasks /opt/airflow/gender_tasks
COPY --chown=airflow:root include /opt/airflow/include
COPY --chown=airflow:root dags /opt/airflow/dags
COPY --chown=airflow:root plugins /opt/airflow/plugins
ENV PYTHONPATH=/opt/airflow
