"""Recipe validation errors as one line each, in the user's terms: a key of another task names that task, a misspelled
key gets a did-you-mean, a quoted value is cut to QUOTE characters. Used by tunesmith/recipe.py's `load`."""
from __future__ import annotations

import difflib
import reprlib
from typing import Literal, get_args, get_origin

from pydantic import BaseModel, ValidationError

QUOTE = 200                     # characters of a value quoted in an error message


def short(value) -> str:
    """repr(value) in at most QUOTE characters, its work bounded too: a YAML alias nest ("billion laughs") is a
    few references in memory but gigabytes once printed."""
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 6, 6, 6, 6
    r.maxstring = r.maxother = r.maxlong = QUOTE
    text = r.repr(value)
    return text if len(text) <= QUOTE else text[:QUOTE - 3] + "..."


def section_of(model: type[BaseModel] | None, loc: tuple) -> type[BaseModel] | None:
    """The section class that `loc` (a pydantic error location, last part the key) points into."""
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model else None
        ann = field.annotation if field else None
        model = section_type(ann)
    return model


def section_type(ann) -> type[BaseModel] | None:
    """The section class of a field's annotation (`Section` or `Section | None`), else None."""
    for t in (ann, *getattr(ann, "__args__", ())):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def has_key(model: type[BaseModel], loc: tuple) -> bool:
    section = section_of(model, loc)
    return bool(section and loc[-1] in section.model_fields)


def accepts(model: type[BaseModel], loc: tuple, value) -> bool:
    """Whether `model`'s field at `loc` is a Literal that allows `value` (a value only another task takes)."""
    section = section_of(model, loc)
    field = section.model_fields.get(loc[-1]) if section else None
    stack, seen = [field.annotation] if field else [], set()
    while stack:
        ann = stack.pop()
        if get_origin(ann) is Literal:
            seen.update(get_args(ann))
        else:
            stack += list(get_args(ann))
    return isinstance(value, (str, int)) and value in seen


def messages(err: ValidationError, cls: type[BaseModel], others: dict[str, type[BaseModel]]) -> list[str]:
    """One line per error of validating a recipe of class `cls` (a Recipe); others: the other tasks' recipe classes."""
    out = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = ".".join(str(p) if len(str(p)) <= QUOTE else short(p) for p in loc)
        if e["type"] == "extra_forbidden":
            users = [name for name, other in others.items() if has_key(other, loc)]
            section = section_of(cls, loc)
            valid = list(section.model_fields) if section else []
            close = difflib.get_close_matches(str(loc[-1])[:QUOTE], valid, n=1, cutoff=0.5)
            if users:                               # right key, wrong task: no did-you-mean, say whose it is
                out.append(f"{path}: does not apply to task '{cls.task_name()}'; it is a key of {', '.join(users)}")
            else:
                hint = f" did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""
                out.append(f"{path}: unknown key;{hint} valid keys here: {', '.join(valid)}")
        elif e["type"] == "missing":
            out.append(f"{path}: required key is missing")
        elif e["type"] == "literal_error" and (users := [name for name, other in others.items()
                                                         if accepts(other, loc, e.get("input"))]):
            out.append(f"{path}: {short(e.get('input'))} does not apply to task '{cls.task_name()}'; it is a value "
                       f"for {', '.join(users)}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = short(e.get("input"))
            out.append(msg if not path or msg.startswith(f"{path}.") else f"{path}: {msg} (got {got})")
    return out
