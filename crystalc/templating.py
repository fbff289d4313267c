"""The Jinja2 environment every backend renders its templates with."""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path

import jinja2


@cache
def environment(target: str) -> jinja2.Environment:
    root = files("crystalc.templates") / target
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(root)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    return env


def render(target: str, template: str, **context: object) -> str:
    return environment(target).get_template(template).render(**context)


def copy_template(target: str, name: str, out_dir: Path) -> Path:
    """Copy a file of templates/<target>/ that needs no rendering (shared C, the Verilog core) into out_dir."""
    path = Path(out_dir) / name
    path.write_bytes((files("crystalc.templates") / target / name).read_bytes())
    return path
