"""`POST /jobs` bodies -> validated requests, or one line saying what is wrong (HTTP 400).

A request carries a batch line's fields (prompt, negative_prompt, seed, size, frame_num, image) plus
per-video sampling and MagCache settings. It is checked exactly as a batch item is, by building
its RunConfig with `config.item_config`, so nothing the ranks would reject ever reaches them.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.config import RunConfig, draw_seed, item_config
from launcher.errors import InputError
from launcher.options import LINE, REQUEST_ONLY, declarations, flags_where, value_type
from launcher.serve.limits import LimitExceeded, Limits

#: a flag's value type -> the JSON types a request may give it as (bool is never an int/float here)
_JSON_TYPES: dict[type, tuple[type, ...]] = {str: (str,), Path: (str,), int: (int,), float: (int, float),
                                             bool: (bool,)}
#: field -> accepted JSON types: every flag options.py lets a request set per video (a guidance
#: scale, `LOW,HIGH` text on the command line, may also be one number)
FIELDS: dict[str, tuple[type, ...]] = {
    declarations()[flag].field or flag:
        (str, int, float) if flag == "sample_guide_scale" else _JSON_TYPES[value_type(flag)]
    for flag in flags_where(per_video=(LINE, REQUEST_ONLY))
}
#: field -> the flag it sets (`seed` -> base_seed)
_FLAG_OF = {declarations()[flag].field or flag: flag for flag in flags_where(per_video=(LINE, REQUEST_ONLY))}
_IMAGE_PATH = re.compile(r"(?!data:)[^\n]{1,4096}\.(png|jpe?g|webp|bmp)", re.IGNORECASE)
_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
_IMAGE_TYPES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp"}


class BadRequest(Exception):
    """The request is malformed or asks for something invalid (HTTP 400, one line)."""


@dataclass(frozen=True, slots=True)
class ServeSettings:
    """What every request is checked against: the server's flags and where images may come from."""

    flags: dict[str, Any]
    image_dir: Path | None = None
    limits: Limits = Limits()

    @property
    def task(self) -> Any:
        """The TaskSpec this server runs."""
        from launcher.wan.tasks import TASKS

        return TASKS[self.flags["task"]]

    @property
    def model_names(self) -> tuple[str, ...]:
        """What a client may call the model: the task, its official Hub repositories, and the Hub
        repository --ckpt_dir names, if it names one."""
        from launcher.hub import is_repo_id

        ckpt = str(self.flags.get("ckpt_dir") or "")
        return self.task.model_names + ((ckpt,) if is_repo_id(ckpt) and ckpt not in self.task.model_names else ())


def _typed(obj: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}")
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if value is None:
            continue
        kinds = FIELDS[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(_KIND_NAMES[k] for k in kinds if k is not int or float not in kinds)
            raise BadRequest(f"field {key!r} must be {names}, got {json.dumps(value)[:60]}")
        out[key] = value
    if not str(out.get("prompt", "")).strip():
        raise BadRequest("no \"prompt\": give the text to generate from")
    return out


def _decode_image(value: str) -> bytes:
    """`data:image/...;base64,XXXX` or bare base64 -> bytes that PIL reads as an image."""
    data = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("field 'image': not base64 (send a data: URL or base64 of a PNG/JPEG) nor a .png/.jpg/.webp/.bmp "
                         "file path (paths are read under the server's --image-dir)") from None
    return raw


def _image_format(raw: bytes, limits: Limits) -> str:
    """The file suffix of an accepted image; its size is checked from the header, before any decoding."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as im:
            width, height = im.size
            fmt = im.format or ""
            if width * height <= limits.max_image_pixels:
                im.verify()
    except Image.DecompressionBombError:  # PIL's own header check, far above ours
        raise BadRequest(f"field 'image': over this server's --max-image-pixels {limits.max_image_pixels}; "
                         "send a smaller image") from None
    except Exception:  # noqa: BLE001 - PIL raises many types for broken data
        raise BadRequest("field 'image': not an image PIL can read; send a PNG or JPEG") from None
    try:
        limits.check_image_size(width, height)
    except LimitExceeded as e:
        raise BadRequest(str(e)) from None
    if fmt not in _IMAGE_TYPES:
        raise BadRequest(f"field 'image': {fmt or 'unknown'} images are not accepted; send a PNG or JPEG")
    return _IMAGE_TYPES[fmt]


def _place_image(value: str, settings: ServeSettings, staged: Path) -> Path:
    """The image file the job will read: an upload saved in the job folder, or an allowed path."""
    if _IMAGE_PATH.fullmatch(value):  # base64 has no '.', so it never ends in an image suffix
        if settings.image_dir is None:
            raise BadRequest("field 'image': paths are not accepted by this server (start it with --image-dir); "
                             "send the image as base64")
        path = Path(value)
        path = (path if path.is_absolute() else settings.image_dir / path).resolve()
        if not path.is_relative_to(settings.image_dir.resolve()):
            raise BadRequest(f"field 'image': {value} is outside --image-dir")
        if not path.is_file():
            raise BadRequest(f"field 'image': {value} not found under --image-dir")
        _image_format(path.read_bytes(), settings.limits)
        return path
    raw = _decode_image(value)
    target = staged / f"image{_image_format(raw, settings.limits)}"
    target.write_bytes(raw)
    return target


def from_text(key: str, text: str) -> Any:
    """A form field's text as the JSON value its FIELDS entry takes (multipart sends only strings)."""
    kinds = FIELDS.get(key, (str,))
    if bool in kinds:
        if text.lower() in ("true", "1", "on", "yes"):
            return True
        if text.lower() in ("false", "0", "off", "no"):
            return False
    for kind in (int, float):
        if kind in kinds:
            try:
                return kind(text)
            except ValueError:
                pass
    return text


def typed_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """The request fields of `obj`, type-checked (BadRequest names an unknown or mistyped field)."""
    return _typed(obj)


def parse_body(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("body is not UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise BadRequest(f"malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(obj, dict):
        raise BadRequest('expected a JSON object like {"prompt": "..."}')
    return _typed(obj)


def job_config(request: dict[str, Any], flags: dict[str, Any], job_dir: Path) -> RunConfig:
    """The RunConfig of a stored request: the server's flags with the request's fields over them.

    A batch item with the same fields gets the same config, hence the same video as `generate`.
    """
    from launcher.planner.schedule import resolve_config

    overrides = {_FLAG_OF[k]: v for k, v in request.items() if k in _FLAG_OF and k != "seed" and v is not None}
    if "sample_guide_scale" in overrides:
        overrides["sample_guide_scale"] = str(overrides["sample_guide_scale"])
    # the request's own first frame, or none (never the server's --image)
    overrides["image"] = None if request.get("image") is None else Path(request["image"])
    seed = request["seed"]
    return resolve_config(item_config(flags, overrides, seed=seed if seed >= 0 else None,
                                      video=Path(job_dir) / "video.mp4"))


def _as_fields(message: str) -> str:
    """Config errors name flags (`--frame_num 6: ...`); a request names fields (`frame_num 6: ...`)."""
    return re.sub(r"--([a-zA-Z][\w-]*)", lambda m: m.group(1).replace("-", "_"), message)


def validate(body: bytes, settings: ServeSettings, staged: Path) -> dict[str, Any]:
    """The stored form of a JSON request body (seed drawn, image placed in `staged`); BadRequest if invalid."""
    return validate_fields(parse_body(body), settings, staged)


def validate_fields(request: dict[str, Any], settings: ServeSettings, staged: Path) -> dict[str, Any]:
    """The stored form of typed request fields (see `parse_body`); BadRequest if invalid.

    `resolved` records what the ranks will make (frames, fps, size), for the answers that describe it.
    """
    if "image" in request:
        request["image"] = str(_place_image(request["image"], settings, staged))
    seed = request.get("seed", int(settings.flags.get("base_seed", -1)))
    if seed < 0:
        seed = draw_seed(-1)
    request["seed"] = seed
    try:
        config = job_config(request, settings.flags, staged)
    except InputError as e:
        raise BadRequest(_as_fields(str(e).splitlines()[0])) from None
    try:
        settings.limits.check_config(config)
    except LimitExceeded as e:
        raise BadRequest(str(e)) from None
    request["sample_steps"] = config.sample_steps
    request["resolved"] = {"frame_num": config.frame_num, "fps": config.task.sample_fps, "width": config.width,
                           "height": config.height}
    return request


def relocate(request: dict[str, Any], staged: Path, job_dir: Path) -> dict[str, Any]:
    """An uploaded image moves with the job folder: rewrite its path."""
    image = request.get("image")
    if image is not None and Path(image).parent == staged:
        return dict(request, image=str(job_dir / Path(image).name))
    return request
