"""Does the fake CuPy (fake_cupy.install()) promise anything the real CuPy lacks?

The launchers, the model and the trainer run against the fake on the CPU; a name or keyword the
fake accepts and CuPy 14 does not would pass every emulated test and fail on the first GPU
run. Walks the fake's public surface (module functions, `cupy.cuda`, its classes' methods,
`cupyx`) and checks each name against the real modules, and each keyword a fake callable takes
against the real callable's parameters (inspect.signature, or the first line of a Cython
docstring), and each default both signatures let us read against the real one. Also the other
way: every CuPy name the project's code spells (cllm_gpu, scripts, tests/gpu: the GPU-only
code never meets the fake) must exist in the real CuPy. Run as a script in a process of its
own (install() replaces `cupy`): prints one line per mismatch, then "surface: N names
checked, M mismatches; K CuPy names in the project's code checked" (`--code FILE...`: only
those files' names).

The cuBLAS module cannot be imported without libcublas, so the parameter lists of the wrappers
the fake stands in for (gemmEx, setStream) are read from the signatures Cython embeds in the
extension's bytes.
"""
from __future__ import annotations

import ast
import inspect
import re
import sys
import types
from pathlib import Path

# Test knobs the fake adds for the emulator's own checks; CuPy has no such names.
FAKE_ONLY = {"cuda.Stream.stack", "cuda.Stream.fail_begin"}
REAL_VERSION = [""]
COMPARED = []   # the callables whose parameters both sides let us read


def _params(fn):
    """(names, required names) of fn's parameters, without self/*args/**kwargs; None if the
    signature cannot be read."""
    try:
        sig = inspect.signature(fn)
        ps = [p for p in sig.parameters.values() if p.name != "self"]
        if any(p.kind == p.VAR_KEYWORD for p in ps):
            return None           # takes any keyword: nothing to compare
        ps = [p for p in ps if p.kind != p.VAR_POSITIONAL]
        return ({p.name for p in ps},
                {p.name for p in ps if p.default is p.empty and p.kind != p.KEYWORD_ONLY})
    except (TypeError, ValueError):
        pass
    listed = _docstring_parameters((getattr(fn, "__doc__", None) or "").strip())
    if listed is None:
        return None
    params = _listed_params(listed)
    return {n for n, _ in params}, {n for n, required in params if required}


def _docstring_parameters(doc):
    """The parameter list of a Cython docstring's first line, `name(...)`, up to its own
    closing parenthesis (a default such as `options=()` has its own); None without one."""
    m = re.match(r"[\w.]+\(", doc)
    if not m:
        return None
    depth = 1
    for i in range(m.end(), len(doc)):
        depth += {"(": 1, ")": -1}.get(doc[i], 0)
        if depth == 0:
            return doc[m.end():i]
    return None


def _listed_params(text):
    """[(name, required)] of a parameter list as Cython writes it in a signature
    ("self, size_t size, stream=None, \\*, casting='same_kind'"), without self, / and *."""
    out, parts, depth, start = [], [], 0, 0
    for i, ch in enumerate(text + ","):   # split at the commas outside a default's brackets
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    for part in (p.strip() for p in parts):
        if not part or part.startswith(("*", "/")) or part in ("self", "\\*"):
            continue
        out.append((part.split("=")[0].split()[-1].strip("*\\"), "=" not in part))
    return out


def _defaults(fn):
    """{parameter: default} of fn's parameters that have one; None if inspect cannot read its
    signature (a Cython function: its docstring's defaults are text, not compared)."""
    try:
        ps = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    return {p.name: p.default for p in ps if p.default is not p.empty}


def _same_default(a, b):
    """Equal defaults; dtype-likes (float, np.float64, 'f8') compared as NumPy dtypes."""
    import numpy as np
    if a is None or b is None:
        return a is b
    try:
        if a == b:
            return True
    except Exception:   # an array-like default: compared as dtypes below
        pass
    try:
        return np.dtype(a) == np.dtype(b)
    except TypeError:
        return False


def _compare_callable(path, fake, real, problems):
    fp, rp = _params(fake), _params(real)
    if fp is None or rp is None:
        return
    COMPARED.append(path)
    extra = fp[0] - rp[0]
    if extra:
        problems.append(f"{path}: the fake takes {sorted(extra)}, CuPy does not")
    missing = rp[1] - fp[1]
    if missing:
        problems.append(f"{path}: CuPy requires {sorted(missing)}, the fake does not")
    # a default the fake picks differently (cupy.empty's dtype: float32 in the fake, float64
    # in CuPy) gives a caller that leaves the argument out other results on the GPU
    fd, rd = _defaults(fake), _defaults(real)
    for name in sorted(set(fd or ()) & set(rd or ())):
        if not _same_default(fd[name], rd[name]):
            problems.append(f"{path}: the fake's default {name}={fd[name]!r}, CuPy's "
                            f"{rd[name]!r}")


def _walk(path, fake, real, problems, seen):
    """Every public attribute of the fake namespace or class `fake` must exist on `real`, and
    every callable among them take no keyword the real one lacks."""
    for name, value in vars(fake).items():
        if name.startswith("_") and name not in ("__enter__", "__exit__"):
            continue
        sub = f"{path}.{name}"
        if sub.split(".", 1)[1] in FAKE_ONLY or sub == "cupy.cuda.nccl":
            continue   # (cuda.nccl: compared with the NCCL extension's signatures, main())
        seen.append(sub)
        if not hasattr(real, name):
            problems.append(f"{sub}: missing in CuPy {REAL_VERSION[0]}")
            continue
        target = getattr(real, name)
        if isinstance(value, (types.SimpleNamespace, type)):
            _walk(sub, value, target, problems, seen)
        if callable(value):
            _compare_callable(sub, value, target, problems)


CUBLAS_WRAPPERS = ("gemmEx", "setStream")   # what fake_cublas.install_modules stands in for
# cupy.cuda.nccl has its names only where libnccl loads (not on CI): the fake's functions and
# NcclCommunicator's methods are compared with the extension's embedded signatures instead
NCCL_CALLABLES = ("get_unique_id", "get_version", "groupStart", "groupEnd", "NcclCommunicator",
                  "NcclCommunicator.allReduce", "NcclCommunicator.reduce",
                  "NcclCommunicator.broadcast", "NcclCommunicator.reduceScatter",
                  "NcclCommunicator.allGather", "NcclCommunicator.abort")


def extension_parameters(stem, names):
    """{name: [parameter names]} of `names` (functions, classes' constructors, "Class.method"),
    from the signatures Cython embeds in CuPy's cupy_backends/cuda/libs/<stem> extension
    (which needs its CUDA library to import); {} for what is not found."""
    found = {}
    data = _extension_bytes(stem) or b""
    for name in names:
        m = re.search(rb"[\n\x00]" + re.escape(name.encode()) + rb"\(([^)]*)\)", data)
        if m:
            found[name] = [n for n, _ in _listed_params(m.group(1).decode())]
    return found


def _extension_bytes(stem):
    """The bytes of CuPy's compiled cupy_backends/cuda/libs/<stem> extension (None if absent):
    the names and signatures it holds can be read without the CUDA library it wraps."""
    import importlib.util
    spec = importlib.util.find_spec("cupy_backends")
    sos = list((Path(spec.origin).parent / "cuda" / "libs").glob(f"{stem}*.so")) if spec else []
    return sos[0].read_bytes() if sos else None


def cublas_parameters():
    return extension_parameters("cublas", CUBLAS_WRAPPERS)


def _compare_listed(path, fake_fn, real_names, problems):
    fake_names = [n for n in inspect.signature(fake_fn).parameters if n != "self"]
    if fake_names != real_names:
        problems.append(f"{path}: the fake takes ({', '.join(fake_names)}), CuPy's "
                        f"({', '.join(real_names)})")


# The code that runs only on a GPU (tests/gpu, the GPU scripts) never meets the fake, so a
# CuPy name it misspells or CuPy lacks would first fail in a GPU slot: every `cupy.` / `cupyx.`
# name any project code spells (through `import cupy as cp`, `from cupy.cuda import nccl`, ...)
# must exist in the real CuPy.
CODE_DIRS = ("cllm_gpu", "scripts", "tests/gpu")


def _cupy_aliases(tree):
    """{local name: dotted CuPy module or name} bound by the file's imports of cupy / cupyx
    (statements, or `pytest.importorskip` / `importlib.import_module` of one)."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in ("cupy", "cupyx"):
                    out[a.asname or a.name.split(".")[0]] = a.name if a.asname else \
                        a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module \
                and node.module.split(".")[0] in ("cupy", "cupyx") and not node.level:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
        elif (isinstance(node, ast.Assign) and len(node.targets) == 1
              and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Call)
              and isinstance(node.value.func, ast.Attribute)
              and node.value.func.attr in ("importorskip", "import_module")
              and node.value.args and isinstance(node.value.args[0], ast.Constant)
              and str(node.value.args[0].value).split(".")[0] in ("cupy", "cupyx")):
            out[node.targets[0].id] = node.value.args[0].value  # cp = pytest.importorskip("cupy")
    for node in ast.walk(tree):  # self.cp, self.nccl = cupy, nccl: "self.cp" is cupy
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
            pairs = zip(target.elts, value.elts) if isinstance(target, ast.Tuple) \
                and isinstance(value, ast.Tuple) else [(target, value)]
            for t, v in pairs:
                if _self_attribute(t) and isinstance(v, ast.Name) and v.id in out:
                    out[_self_attribute(t)] = out[v.id]
    return out


def _self_attribute(node):
    """'self.cp' for the expression self.cp, else None."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
            and node.value.id == "self":
        return f"self.{node.attr}"
    return None


def code_cupy_names(files):
    """[(file, line, dotted name, keywords)] of every CuPy name the files spell: an imported
    one, an attribute chain on a name (or a `self.` attribute) their imports bound to CuPy, or
    `getattr(cp, "name")`; keywords: those a call of it passes there (a tuple, empty if
    none)."""
    found = []
    for f in files:
        tree = ast.parse(Path(f).read_text())
        aliases = _cupy_aliases(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for local, dotted in aliases.items():
                    if any((a.asname or a.name.split(".")[0]) == local for a in node.names):
                        found.append((str(f), node.lineno, dotted, ()))
            elif isinstance(node, ast.Attribute) and not isinstance(node.ctx, ast.Store) \
                    or isinstance(node, ast.Call) and node.keywords:
                chain, x = [], node.func if isinstance(node, ast.Call) else node
                while isinstance(x, ast.Attribute) and _self_attribute(x) not in aliases:
                    chain.append(x.attr)
                    x = x.value
                base = _self_attribute(x) or (x.id if isinstance(x, ast.Name) else None)
                if base in aliases:
                    keywords = tuple(k.arg for k in getattr(node, "keywords", ()) if k.arg)
                    found.append((str(f), node.lineno, ".".join([aliases[base], *chain[::-1]]),
                                  keywords))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id == "getattr" and len(node.args) >= 2 \
                    and isinstance(node.args[1], ast.Constant) \
                    and isinstance(node.args[1].value, str):
                base = _self_attribute(node.args[0]) or getattr(node.args[0], "id", None)
                if base in aliases:
                    found.append((str(f), node.lineno,
                                  f"{aliases[base]}.{node.args[1].value}", ()))
    return sorted(set(found))


def _in_extension(module, names):
    """'ok' / 'missing': are `names` all identifiers in the compiled extension a library shim
    re-exports where its library loads (cupy.cuda.nccl: cupy_backends/cuda/libs/nccl*.so,
    whose names exist here even without libnccl); 'unloadable' without the extension."""
    data = _extension_bytes(module.__name__.rsplit(".", 1)[1])
    if data is None:
        return "unloadable"
    return "ok" if all(re.search(rb"(?<![A-Za-z0-9_])" + n.encode() + rb"(?![A-Za-z0-9_])",
                                 data) for n in names) else "missing"


def resolve(dotted):
    """('missing', None) if CuPy has no such name, ('unloadable', None) if a module on the way
    cannot be imported here, else ('ok', the object; None where read in an extension). A
    library shim whose library is absent here (cupy.cuda.nccl without libnccl: `available`
    False, no names) is read in its extension instead."""
    import importlib
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, name in enumerate(parts[1:], 1):
        try:
            obj = getattr(obj, name)
            continue
        except AttributeError:
            if not isinstance(obj, types.ModuleType):
                return "missing", None    # an attribute of a class or object
            if getattr(obj, "available", True) is False:
                return _in_extension(obj, parts[i:]), None
        try:
            obj = importlib.import_module(".".join(parts[:i + 1]))
        except ModuleNotFoundError as e:
            return ("missing" if e.name == ".".join(parts[:i + 1]) else "unloadable"), None
        except ImportError:
            return "unloadable", None
    return "ok", obj


def check_code(root, problems, files=None):
    """Every CuPy name the project's code (or `files`) spells exists in the real CuPy (before
    install()), and every keyword a call passes to one is among its parameters (where they
    can be read); returns how many names (and calls) were checked."""
    if files is None:
        files = [f for d in CODE_DIRS for f in sorted((root / d).rglob("*.py"))]
    names = code_cupy_names(files)
    unloadable = set()
    for f, line, dotted, keywords in names:
        state, obj = resolve(dotted)
        where = Path(f).relative_to(root) if Path(f).is_relative_to(root) else f
        if state == "missing":
            problems.append(f"{where}:{line}: {dotted} missing in CuPy {REAL_VERSION[0]}")
        elif state == "unloadable":
            unloadable.add(dotted)
        elif keywords and obj is not None:
            # a keyword CuPy's callable does not take (its parameters where readable)
            params = _params(obj)
            if params is None and isinstance(obj, type):
                params = _params(obj.__init__)
            for k in keywords:
                if params is not None and k not in params[0]:
                    problems.append(f"{where}:{line}: {dotted} takes no keyword {k!r} in CuPy "
                                    f"{REAL_VERSION[0]}")
    for dotted in sorted(unloadable):
        print(f"code: {dotted} not checked (its module does not import here)")
    return len(names)


def main():
    import cupy as real
    import cupyx as real_x
    REAL_VERSION[0] = real.__version__
    real_cublas = cublas_parameters()    # before install(), which replaces cupy_backends
    real_nccl = extension_parameters("nccl", NCCL_CALLABLES)
    problems = []
    in_code = check_code(Path(__file__).resolve().parents[2], problems)
    from tests.cuda_emulator import fake_cupy
    fake = fake_cupy.install()
    seen = []
    _walk("cupy", fake, real, problems, seen)
    _walk("cupyx", sys.modules["cupyx"], real_x, problems, seen)
    fake_mod = sys.modules["cupy_backends.cuda.libs.cublas"]
    for name in CUBLAS_WRAPPERS:
        if name not in real_cublas:
            print(f"cublas.{name}: signature not found in the cuBLAS extension")
            continue
        seen.append(f"cupy_backends.cuda.libs.cublas.{name}")
        _compare_listed(f"cublas.{name}", getattr(fake_mod, name), real_cublas[name], problems)
    fake_nccl = fake.cuda.nccl
    for name in NCCL_CALLABLES:
        if name not in real_nccl:
            print(f"nccl.{name}: signature not found in the NCCL extension")
            continue
        seen.append(f"cupy.cuda.nccl.{name}")
        fn = fake_nccl
        for part in name.split("."):
            fn = getattr(fn, part)
        _compare_listed(f"cupy.cuda.nccl.{name}", fn, real_nccl[name], problems)
    for p in problems:
        print("MISMATCH", p)
    print(f"surface: {len(seen)} names checked, {len(COMPARED)} signatures compared, "
          f"{len(problems)} mismatches; {in_code} CuPy names in the project's code checked")
    return 1 if problems else 0


def main_code(files):
    """`surface.py --code FILE...`: only the CuPy names these files spell."""
    import cupy
    REAL_VERSION[0] = cupy.__version__
    problems = []
    n = check_code(Path.cwd(), problems, [Path(f) for f in files])
    for p in problems:
        print("MISMATCH", p)
    print(f"code: {n} CuPy names checked, {len(problems)} mismatches")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main_code(sys.argv[2:]) if sys.argv[1:2] == ["--code"] else main())
