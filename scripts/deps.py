"""Print pyproject.toml's dependency list for pip (stdlib only: runs before the venv exists)."""
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

with open("pyproject.toml", "rb") as f:
    meta = tomllib.load(f)
deps = meta["tool"]["tokar"]["no_deps"] if "--no-deps" in sys.argv else meta["project"]["dependencies"]
print("\n".join(deps))
