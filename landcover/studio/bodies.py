"""The API's request bodies, read within a size limit and checked by type before any work.

Every malformed body (not JSON, wrong types, deep nesting, a lone surrogate, a tab name with
control characters) is one 400 line naming the field, never a traceback: pydantic parses and
checks the bytes in one pass, and its JSON parser bounds nesting itself.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from landcover.errors import LandcoverError
from landcover.studio.strokes import MAX_POINTS


class BodyError(LandcoverError):
    """A request body the API will not act on."""


def _plain_text(value: str) -> str:
    """Tab names are shown and compared later: printable text that survives UTF-8, or none."""
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError("must not hold control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from err
    return value


Tab = Annotated[str, Field(max_length=64), AfterValidator(_plain_text)]
Point = tuple[float, float]
Model = TypeVar("Model", bound=BaseModel)


class EditBody(BaseModel):
    """One stroke: a brush line, a polygon, or a region whose map is accepted."""

    model_config = ConfigDict(extra="ignore")
    kind: Literal["paint", "polygon", "accept"] = "paint"
    points: list[Point] = Field(min_length=1, max_length=MAX_POINTS)
    radius: float = 0.0
    tab: Tab = ""
    class_index: int | None = None


class UndoBody(BaseModel):
    """Take back this tab's latest stroke."""

    model_config = ConfigDict(extra="ignore")
    tab: Tab = ""


class EmptyBody(BaseModel):
    """Retrain and undo-retrain take no fields (an object is still required)."""

    model_config = ConfigDict(extra="ignore")


def parse(model: type[Model], raw: bytes) -> Model:
    """`raw` (read within the size limit by the app's `read_body`) as a `model`, or one
    BodyError naming the first problem."""
    if not raw.strip():
        raise BodyError("the request body is empty: send a JSON object")
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise BodyError(f"request body: {where}: {first['msg']}{more}") from None
