"""The Jinja2 environment every backend renders its templates with."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

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
