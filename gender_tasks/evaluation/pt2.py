"""Load a torch.export archive (`model.pt2`) without letting its bytes run code.

torch.export.load (torch 2.14, torch/export/pt2_archive/_package.py and torch/_export/serde/serialize.py)
is documented to "use pickle under the hood: never load data from an untrusted source". Reading its
source, a .pt2 reaches pickle or eval in these places, and nowhere else:

- a weight or constant whose payload config says `use_pickle` (tensor subclasses): torch.load(weights_only=False);
- a constant named custom_obj_* (torch._C._pickle_load_obj) or opaque_obj_* (pickle.loads);
- the legacy layouts: weights in data/weights/<model>.pt, constants in data/constants/<model>.pt, and the
  torch 2.7 zip (serialized_state_dict.pt, ...), all unpickled; an AOTInductor package (compiled code);
- the sample inputs (data/sample_inputs/<model>.pt): torch.load(weights_only=True), but on failure it
  retries with weights_only=False;
- symbolic shape expressions (`expr_str` in models/<model>.json): sympy.sympify, which evaluates Python;
- guard code (`guards_code` there): Python source that ExportedProgram.module() compiles into assertions.

`check_archive` refuses, before torch.export.load sees the bytes, any archive that would take one of
those paths: only the files torch.export.save writes for plain tensors are allowed; every payload must be
raw bytes (`use_pickle` false); the sample inputs must load with weights_only=True here first (so torch's
retry never happens); every shape expression must be arithmetic over shape symbols (s0, u1) and sympy's
integer functions (no attribute access, no call of anything else); and every guard must be an expression
comparing the inputs' sizes (checked on its syntax tree: the name L, literals, subscripts, .size() and the
like, arithmetic, comparisons). What remains is JSON, raw tensor bytes and weights_only loading. The
pipeline also verifies a model's sha256 against its model card before any of this: the check is for a
card and a model replaced together, or a file given by hand.
"""

from __future__ import annotations

import ast
import io
import json
import re
import zipfile

ROOT = "archive/"
# Every file torch.export.save (torch 2.14) writes for one program named "model" of plain tensors.
_ALLOWED = re.compile(
    r"^archive/(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json|"
    r"data/weights/weight_\d+|data/weights/model_weights_config\.json|data/constants/tensor_constant_\d+|"
    r"data/constants/model_constants_config\.json|data/sample_inputs/model\.pt|extra/[A-Za-z0-9_.-]+)$"
)
# A shape expression: numbers, operators, parentheses, commas and names; each name must be a symbol or one
# of the functions torch's shape expressions use.
_EXPR = re.compile(r"^[A-Za-z0-9_ +\-*/%(),<>=!.]*$")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SYMBOL = re.compile(r"^[suqc]\d+$")
# How a symbol is written with its assumptions: only these assumptions, only True or False.
_DECLARED_SYMBOL = re.compile(
    r"Symbol\('([suqc]\d+)'(?:, (?:positive|integer|nonnegative|real|finite)=(?:True|False))*\)"
)
_FUNCTIONS = {"Max", "Min", "Mod", "PythonMod", "FloorDiv", "CleanDiv", "CeilDiv", "IntTrueDiv", "FloatTrueDiv",
              "TruncToInt", "FloorToInt", "CeilToInt", "RoundToInt", "ToFloat", "Integer", "Eq", "Ne", "Ge", "Gt",
              "Le", "Lt", "And", "Or", "Not", "oo", "True", "False", "Abs", "Identity"}  # fmt: skip
MAX_MEMBERS = 100_000  # files in one archive: far more than any model here has tensors


class UnsafeArchive(ValueError):
    """The archive holds something torch.export.load would unpickle or evaluate; the message says what."""


def is_pt2(data: bytes) -> bool:
    """Whether `data` is a zip holding a torch.export archive (archive/archive_format says "pt2")."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return zf.read(f"{ROOT}archive_format").strip() == b"pt2"
    except (zipfile.BadZipFile, KeyError, OSError, ValueError):
        return False


def _check_expressions(node) -> None:
    """Every `expr_str` below `node` (the program's JSON) is plain shape arithmetic."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "expr_str":
                    _check_expression(value)
                else:
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _check_expression(text) -> None:
    if not isinstance(text, str) or len(text) > 10_000:
        raise UnsafeArchive(f"a shape expression is not plain arithmetic ({str(text)[:80]!r})")
    plain = _DECLARED_SYMBOL.sub(r"\1", text)  # Symbol('s77', positive=True, integer=True) -> s77
    if not _EXPR.match(plain) or "__" in plain:
        raise UnsafeArchive(f"a shape expression is not plain arithmetic ({text[:80]!r})")
    for name in _NAME.findall(re.sub(r"\d+\.\d+(e[+-]?\d+)?", "", plain)):
        if not (_SYMBOL.match(name) or name in _FUNCTIONS):
            raise UnsafeArchive(f"a shape expression names {name!r}, which is neither a shape symbol nor an integer "
                                "function")  # fmt: skip
    if re.search(r"[A-Za-z0-9_)]\s*\.\s*[A-Za-z_]", plain):
        raise UnsafeArchive(f"a shape expression accesses an attribute ({text[:80]!r})")


# Guard code (ExportedProgram.module() compiles it into Python assertions): comparisons of input sizes only.
_GUARD_NODES = (ast.Expression, ast.Compare, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.BinOp,
                ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
                ast.Subscript, ast.Name, ast.Constant, ast.Call, ast.Attribute, ast.Load)  # fmt: skip
_GUARD_METHODS = {"size", "stride", "dim", "numel"}


def _check_guard(code) -> None:
    """A guard is an expression over the inputs' sizes (L['xs'][0].size()[0] == L['xs'][1].size()[0]): only
    the name L, literals, subscripts, tensor size methods called without arguments, arithmetic and comparisons."""
    if not isinstance(code, str) or len(code) > 10_000:
        raise UnsafeArchive("it carries guard code that is not a short expression")
    try:
        tree = ast.parse(code, mode="eval")
    except SyntaxError:
        raise UnsafeArchive(f"it carries guard code that is not an expression ({code[:80]!r})") from None
    for node in ast.walk(tree):
        bad = not isinstance(node, _GUARD_NODES)
        bad = bad or (isinstance(node, ast.Name) and node.id != "L")
        bad = bad or (isinstance(node, ast.Constant) and not isinstance(node.value, int | str))
        bad = bad or (
            isinstance(node, ast.Call) and (node.args or node.keywords or not isinstance(node.func, ast.Attribute))
        )
        bad = bad or (isinstance(node, ast.Attribute) and node.attr not in _GUARD_METHODS)
        if bad:
            raise UnsafeArchive(f"it carries guard code, which loading would compile and run as Python, that is not a "
                                f"comparison of input sizes ({code[:80]!r})")  # fmt: skip


def _payloads(zf: zipfile.ZipFile, name: str, prefix: str) -> None:
    """Every payload in the config `name` is raw tensor bytes (never pickled) named `prefix`<n>."""
    config = json.loads(zf.read(name))
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise UnsafeArchive(f"{name} is not a payload config")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise UnsafeArchive(f"{fqn} is stored pickled (use_pickle), which loading would unpickle")
        if not re.match(rf"^{prefix}\d+$", str(meta.get("path_name", ""))):
            raise UnsafeArchive(f"{fqn} is stored as {str(meta.get('path_name'))[:80]!r}, not as a plain tensor")


def check_archive(data: bytes) -> None:
    """Raise UnsafeArchive where torch.export.load would unpickle or evaluate anything in `data` (see the
    module docstring); return quietly for an archive of plain tensors, JSON and weights_only inputs."""
    import torch

    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise UnsafeArchive("not a zip archive") from None
    with zf:
        names = zf.namelist()
        if len(names) > MAX_MEMBERS:
            raise UnsafeArchive(f"{len(names)} files, over {MAX_MEMBERS}")
        extra = [n for n in names if not _ALLOWED.match(n)]
        if extra:
            raise UnsafeArchive(f"it holds {extra[0]!r}, which a plain torch.export program does not have "
                                f"(pickled or compiled content){f' and {len(extra) - 1} more' if len(extra) > 1 else ''}")  # fmt: skip
        for required in ("archive_format", "models/model.json", "data/weights/model_weights_config.json",
                         "data/constants/model_constants_config.json", "data/sample_inputs/model.pt"):  # fmt: skip
            if ROOT + required not in names:
                raise UnsafeArchive(f"it has no {required}")
        try:
            _payloads(zf, f"{ROOT}data/weights/model_weights_config.json", "weight_")
            _payloads(zf, f"{ROOT}data/constants/model_constants_config.json", "tensor_constant_")
            program = json.loads(zf.read(f"{ROOT}models/model.json"))
            if not isinstance(program, dict):
                raise UnsafeArchive("models/model.json is not a program")
            guards = program.get("guards_code") or []
            if not isinstance(guards, list):
                raise UnsafeArchive("its guard code is not a list")
            for guard in guards:  # compiled into Python by ExportedProgram.module()
                _check_guard(guard)
            _check_expressions(program)
        except (ValueError, UnicodeDecodeError) as exc:
            if isinstance(exc, UnsafeArchive):
                raise
            raise UnsafeArchive(f"its configs are not valid JSON ({exc})") from None
        try:
            torch.load(io.BytesIO(zf.read(f"{ROOT}data/sample_inputs/model.pt")), weights_only=True)
        except Exception as exc:  # noqa: BLE001  (whatever weights_only refuses, torch would unpickle)
            raise UnsafeArchive(f"its sample inputs do not load with weights_only=True ({type(exc).__name__})") \
                from None  # fmt: skip


def load_archive(data: bytes):
    """(the program as a callable module, the archive's extra files) of a checked archive: check_archive
    first, then torch.export.load."""
    import torch

    check_archive(data)
    extra: dict[str, str] = {"meta.json": ""}  # a non-empty dict: torch replaces an empty one with its own
    program = torch.export.load(io.BytesIO(data), extra_files=extra)
    return program.module(), extra
