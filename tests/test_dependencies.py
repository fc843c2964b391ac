"""pyproject.toml declares what the code imports, nothing it does not, with bounds the code needs."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("mathtir", "ray_eval", "convert", "bench", "tests")
# Imported only where nothing here can run them: they come with the GPU images (containers/), never from PyPI.
IMAGE_ONLY = {"vllm", "transformer_engine"}
# Declared though no module imports them by name, each for a reason the code depends on.
USED_WITHOUT_IMPORT = {
    "tensorboard": "torch.utils.tensorboard (the trainer's TensorBoard logs) needs it installed",
    "mpmath": "pre-imported by name in the sandbox's math stack (mathtir/sandbox/pool.py)",
    "gguf": "transformers reads the SmolLM2 GGUF weights through it (mathtir/models/smollm2.py)",
    "mathtir": "the demo extra is train + eval",
    "ruff": "a tool: the test command runs it",
    "import-linter": "a tool: the test command runs lint-imports",
    "pytest-timeout": "a pytest plugin (the timeout setting in pyproject.toml)",
    "pytest-xdist": "a pytest plugin (quickstart's test command runs the suite with -n 2)",
    "fastapi": "`transformers serve`, the real OpenAI-compatible server the backend tests start, needs it",
    "uvicorn": "`transformers serve` runs on it",
    "openai": "`transformers serve` imports its request types",
    "accelerate": "transformers 5 loads a GGUF file, and `transformers serve` every model (a device_map), only "
                  "with it installed",
}


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> dict[str, list[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = {"core": project["dependencies"], **project["optional-dependencies"]}
    return {group: list(reqs) for group, reqs in groups.items()}


def _imports() -> dict[str, set[str]]:
    """Top-level module name -> files importing it (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for top in SOURCES:
        for path in (REPO / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                         else [])
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


def test_every_import_is_declared_and_every_declaration_used():
    # the package, and the modules next to a script or test (its directory is on sys.path when it runs)
    local = {"mathtir", "tests"} | {p.stem for top in SOURCES[1:] for p in (REPO / top).iterdir()}
    distributions = importlib.metadata.packages_distributions()
    declared = {_name(r) for reqs in _declared().values() for r in reqs}
    imported_distributions = set()
    undeclared = []
    for module, files in sorted(_imports().items()):
        if module in sys.stdlib_module_names or module in local or module == "__future__" or module in IMAGE_ONLY:
            continue
        owners = {d.lower().replace("_", "-") for d in distributions.get(module, [])}
        assert owners, f"{module} (imported by {sorted(files)[0]}) belongs to no installed distribution"
        imported_distributions |= owners
        if not owners & declared:
            undeclared.append(f"{module} ({', '.join(sorted(owners))}; imported by {sorted(files)[0]})")
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    unused = sorted(declared - imported_distributions - set(USED_WITHOUT_IMPORT))
    assert not unused, f"declared in pyproject.toml but never imported: {unused}"


def _lower_bound(group: str, name: str) -> tuple[int, ...]:
    (requirement,) = [r for r in _declared()[group] if _name(r) == name]
    version = re.search(r"(?:>=|==)\s*([0-9.]+)", requirement)
    assert version, f"{group}: {requirement} has no lower bound"
    return tuple(int(x) for x in version.group(1).split(".") if x)


def test_bounds_match_what_the_code_needs():
    # megatron-core's own torch floor is ours: a lower bound below it only promises a failed install.
    floor = next(r for r in importlib.metadata.requires("megatron-core") if r.startswith("torch") and "extra" not in r)
    megatron_torch = tuple(int(x) for x in re.search(r">=\s*([0-9.]+)", floor).group(1).split("."))
    for group in ("train", "eval"):
        assert _lower_bound(group, "torch") >= megatron_torch[:2]
        # from_pretrained(dtype=...) is honoured from transformers 4.56; older ones load fp32 silently.
        assert _lower_bound(group, "transformers") >= (4, 56)
    passes_dtype = [str(p.relative_to(REPO)) for p in (REPO / "mathtir").rglob("*.py")
                    if re.search(r"from_pretrained\([^)]*\bdtype=", p.read_text())]
    assert passes_dtype, "the bound above guards from_pretrained(dtype=...) calls; none left?"
