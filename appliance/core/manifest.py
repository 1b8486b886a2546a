"""Read a Space's README.md front matter the way Hugging Face Spaces does, and check it."""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from ..errors import ApplianceError, ManifestError

SDKS = ("gradio", "streamlit", "docker", "static")
DEFAULT_APP_FILES = {"gradio": "app.py", "streamlit": "app.py", "static": "index.html"}
# Where the app listens inside its container; docker Spaces pick theirs with app_port,
# and static Spaces are served by our own server on 7860.
SDK_PORTS = {"gradio": 7860, "streamlit": 8501, "static": 7860}
DEFAULT_STARTUP_TIMEOUT = 1800
CONFIG_REFERENCE = "https://huggingface.co/docs/hub/spaces-config-reference"

# HF key name -> Manifest attribute, for the keys whose names differ.
_RENAMED = {"colorFrom": "color_from", "colorTo": "color_to", "fullWidth": "full_width"}
_HF_NAMES = {attribute: key for key, attribute in _RENAMED.items()}
_VERSION_KEYS = ("sdk_version", "python_version")
# Versions end up on a pip command line, so only a PEP 440-like shape gets through.
_SDK_VERSION = re.compile(
    r"[0-9]+(?:\.[0-9]+)*"
    r"(?:[-.]?(?:a|b|c|rc|alpha|beta|pre|preview|post|dev)[0-9]*)*"
    r"(?:\+[A-Za-z0-9]+(?:[.-][A-Za-z0-9]+)*)?",
    re.IGNORECASE,
)
_PYTHON_VERSION = re.compile(r"[0-9]+(?:\.[0-9]+){0,2}")
_DURATION = re.compile(r"(?:([0-9]{1,6})h)?(?:([0-9]{1,6})m)?(?:([0-9]{1,9})s)?", re.IGNORECASE)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]++")
_BASE_PATH = re.compile(r"/[^\s\x00-\x1f\x7f]*+")
# Anchored and possessive, like every pattern here that sees a README: none may backtrack.
_OPENING_FENCE = re.compile(r"\ufeff?\s*+---[ \t]*+(?:[\r\n]|$)")
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
# Limits on unknown keys' values, so YAML alias bombs cannot blow up to_dict().
_MAX_NODES = 10_000
_MAX_DEPTH = 50
# Python refuses to print ints past 4300 digits; no front matter needs one that long.
_MAX_INT = 10**100
# Front matter sits at the top; reading more of a huge README buys nothing.
_README_LIMIT = 1024 * 1024
_OAUTH_MAX_MINUTES = 43_200  # 30 days, Hugging Face's documented maximum


@dataclass(frozen=True)
class Manifest:
    """What a Space's README front matter says, with Hugging Face's defaults filled in."""

    sdk: str
    sdk_version: str | None = None
    python_version: str = "3.10"
    app_file: str | None = None
    app_port: int = 7860
    base_path: str = "/"
    title: str | None = None
    emoji: str | None = None
    color_from: str | None = None
    color_to: str | None = None
    full_width: bool = False
    header: str = "default"
    short_description: str | None = None
    models: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    thumbnail: str | None = None
    pinned: bool = False
    license: str | None = None
    hf_oauth: bool = False
    hf_oauth_scopes: list[str] = field(default_factory=list)
    hf_oauth_expiration_minutes: int | None = None
    hf_oauth_authorized_org: list[str] = field(default_factory=list)
    suggested_hardware: str | None = None
    suggested_storage: str | None = None
    disable_embedding: bool = False
    startup_duration_timeout: int = DEFAULT_STARTUP_TIMEOUT
    custom_headers: dict[str, str] = field(default_factory=dict)
    preload_from_hub: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @property
    def container_port(self) -> int:
        """Return the port the app listens on inside its container."""
        return SDK_PORTS.get(self.sdk, self.app_port)

    def to_dict(self) -> dict:
        """Return the front matter as JSON-ready data under Hugging Face's key names."""
        result: dict[str, Any] = {}
        for item in fields(self):
            if item.name in ("extra", "warnings"):
                continue
            value = getattr(self, item.name)
            if value is None:
                continue
            if isinstance(value, list | dict):
                value = value.copy()
            result[_HF_NAMES.get(item.name, item.name)] = value
        for key, value in self.extra.items():
            result.setdefault(key, value)
        return result


def split_front_matter(text: str) -> tuple[str | None, str]:
    """Split a README into its YAML front matter (None when absent) and its body."""
    located = _locate_front_matter(text)
    if located is None:
        return None, text
    return located[0], located[1]


def parse_manifest(readme_text: str) -> Manifest:
    """Parse a README's front matter into a Manifest, or raise ManifestError."""
    located = _locate_front_matter(readme_text)
    if located is None:
        if _OPENING_FENCE.match(readme_text):
            raise _config_error(
                "README.md front matter has no closing '---' line",
                "End the YAML block with a line holding only '---'",
            )
        raise _config_error(
            "README.md has no YAML front matter (a block between '---' lines at the top)",
            "Start README.md with '---', a line such as 'sdk: gradio', then '---'",
        )
    yaml_text, _body, first_line = located
    data = _load_yaml(yaml_text, first_line)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _config_error(
            f"README.md front matter must be a YAML mapping of keys to values, got {_show(data)}",
            "Write one 'key: value' per line, such as 'sdk: gradio'",
        )
    data = {key if isinstance(key, str) else str(key): value for key, value in data.items()}
    return _build(data)


def load_manifest(checkout: Path) -> Manifest:
    """Read checkout/README.md into a Manifest and check that its app file exists."""
    root = checkout.resolve()
    readme = checkout / "README.md"
    try:
        target = readme.resolve()
    except (OSError, RuntimeError) as exc:
        raise _config_error(f"Cannot read README.md: {exc}") from None
    if not target.is_relative_to(root):
        raise _config_error(
            "README.md is a symlink that leads outside the repository",
            "Commit README.md itself rather than a link to it",
        )
    if not target.is_file():
        raise _config_error(
            "The repository has no README.md",
            "Spaces read their settings (sdk, app_file...) from the YAML front matter "
            f"at the top of README.md; see {CONFIG_REFERENCE}",
        )
    try:
        with target.open("rb") as handle:
            data = handle.read(_README_LIMIT + 1)
    except OSError as exc:
        raise _config_error(f"Cannot read README.md: {exc.strerror or exc}") from None
    # "replace" because the read limit may cut a character in two, far below the front matter.
    text = data[:_README_LIMIT].decode("utf-8-sig", errors="replace")
    if len(data) > _README_LIMIT and _OPENING_FENCE.match(text) and not _locate_front_matter(text):
        raise _config_error(
            f"README.md front matter is too large: it does not end within the first "
            f"{_README_LIMIT // 2**20} MiB of the file",
            "Keep the YAML block at the top of README.md short and end it with a '---' line",
        )
    manifest = parse_manifest(text)
    check_app_file(checkout, manifest)
    return manifest


def card_fields(checkout: Path) -> dict[str, str]:
    """What a card and a page header show (title, emoji, colours, short_description, sdk) as
    far as README.md's front matter reads, for a Space whose front matter made no Manifest
    (no app file, a bad key): {} when there is nothing to read. Never raises."""
    try:
        readme = (checkout / "README.md").resolve()
        if not readme.is_relative_to(checkout.resolve()) or not readme.is_file():
            return {}
        with readme.open("rb") as handle:
            text = handle.read(_README_LIMIT).decode("utf-8-sig", errors="replace")
        located = _locate_front_matter(text)
        data = _load_yaml(located[0], located[2]) if located else None
    except (ApplianceError, OSError, RuntimeError):
        return {}
    if not isinstance(data, dict):
        return {}
    found = {key: value.strip()[:200] for key in ("title", "emoji", "short_description")
             if isinstance(value := data.get(key), str) and value.strip()}
    found.update({key: data[key] for key in ("colorFrom", "colorTo")
                  if data.get(key) in CARD_COLORS})
    if data.get("sdk") in SDKS:
        found["sdk"] = data["sdk"]
    return found


def check_app_file(checkout: Path, manifest: Manifest) -> None:
    """Raise ManifestError(stage NO_APP_FILE) unless the app file is a file in the checkout."""
    name = manifest.app_file
    if name is None:
        return
    problem = _app_file_problem(name)
    if problem:
        raise _config_error(f"Key 'app_file' {problem}, got {_show(name)}")
    label = f"App file {_show(name)} (app_file)"
    path = checkout / name
    try:
        target = path.resolve()
    except (OSError, RuntimeError):
        raise _missing_app_file(f"{label} cannot be resolved (a symlink loop?)") from None
    if not target.is_relative_to(checkout.resolve()):
        raise _missing_app_file(
            f"{label} is a symlink that leads outside the repository",
            "Commit the file itself, not a link to a path outside the Space",
        )
    if target.is_file():
        return
    if path.exists() or path.is_symlink():
        raise _missing_app_file(f"{label} is not a regular file")
    raise _missing_app_file(f"{label} was not found in the repository")


def _missing_app_file(
    message: str,
    hint: str = "Add the file, or set app_file in README.md to the file that starts the app",
) -> ManifestError:
    return ManifestError(message, hint=hint, stage="NO_APP_FILE")


def _config_error(message: str, hint: str | None = None) -> ManifestError:
    return ManifestError(message, hint=hint, stage="CONFIG_ERROR")


def _locate_front_matter(text: str) -> tuple[str, str, int] | None:
    """Return (yaml, body, README line number of the yaml's first line), or None."""
    lines = text.removeprefix("\ufeff").splitlines(keepends=True)
    start = 0
    while start < len(lines) and not lines[start].strip():
        start += 1
    if start >= len(lines) or lines[start].strip() != "---":
        return None
    for end in range(start + 1, len(lines)):
        if lines[end].rstrip() == "---":
            yaml_text = "".join(lines[start + 1 : end])
            return yaml_text, "".join(lines[end + 1 :]), start + 2
    return None


class _FrontMatterLoader(yaml.SafeLoader):
    """SafeLoader that keeps version keys as written (3.10, not 3.1) and locates bad values."""

    def construct_document(self, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            for key_node, value_node in node.value:
                if (
                    isinstance(key_node, yaml.ScalarNode)
                    and key_node.value in _VERSION_KEYS
                    and isinstance(value_node, yaml.ScalarNode)
                    and value_node.tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
                ):
                    value_node.tag = "tag:yaml.org,2002:str"
        return super().construct_document(node)

    def construct_yaml_int(self, node: yaml.Node) -> int:
        value = super().construct_yaml_int(node)
        if abs(value) >= _MAX_INT:
            raise yaml.constructor.ConstructorError(
                None, None, "this integer is too large", node.start_mark
            )
        return value

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, OverflowError) as exc:
            # PyYAML's constructors raise these bare (the date 2024-13-45); give them a place.
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value ({exc})", node.start_mark
            ) from None


# PyYAML's constructor table holds plain functions, so the override must be registered.
_FrontMatterLoader.add_constructor("tag:yaml.org,2002:int", _FrontMatterLoader.construct_yaml_int)


def _load_yaml(text: str, first_line: int) -> Any:
    loader = _FrontMatterLoader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" (line {mark.line + first_line}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or exc
        raise _config_error(
            f"README.md front matter is not valid YAML: {problem}{where}",
            f"Fix the YAML between the '---' lines; see {CONFIG_REFERENCE}",
        ) from None
    except (RecursionError, ValueError, TypeError, OverflowError) as exc:
        # Deep nesting, or a constructor error that escaped construct_object.
        raise _config_error(f"README.md front matter cannot be read: {exc}") from None
    finally:
        loader.dispose()


def _build(data: dict[str, Any]) -> Manifest:
    if data.get("sdk") is None:
        raise _config_error(
            "Key 'sdk' is missing from the README front matter",
            f"Add 'sdk: gradio' (valid values: {', '.join(SDKS)})",
        )
    values = {
        _RENAMED.get(key, key): parse(data[key], key)
        for key, parse in _PARSERS.items()
        if data.get(key) is not None
    }
    sdk = values["sdk"]
    values.setdefault("app_file", DEFAULT_APP_FILES.get(sdk))
    warnings = _drop_unknown_colors(values)
    if "sdk_version" not in values and sdk in ("gradio", "streamlit"):
        warnings.append(f"sdk_version missing; the newest {sdk} will be installed")
    if "sdk_version" in values and sdk in ("docker", "static"):
        warnings.append(f"sdk_version is ignored for {sdk} Spaces")
    if "app_port" in values and sdk != "docker":
        warnings.append(f"app_port is ignored for {sdk} Spaces (they listen on {SDK_PORTS[sdk]})")
    extra = {key: _plain(value, key) for key, value in data.items() if key not in _PARSERS}
    return Manifest(**values, extra=extra, warnings=tuple(warnings))


def _show(value: Any) -> str:
    """Render a value for an error message without dumping a whole structure."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str | int | float | datetime.date) or value is None:
        shown = repr(value)
        return shown if len(shown) <= 60 else shown[:57] + "..."
    return f"a {type(value).__name__}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _text(value: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    if _is_number(value):
        return str(value)
    raise _config_error(f"Key '{key}' must be a string, got {_show(value)}")


def _choice(*allowed: str) -> Callable[[Any, str], str]:
    def parse(value: Any, key: str) -> str:
        if isinstance(value, str) and value.strip() in allowed:
            return value.strip()
        raise _config_error(f"Key '{key}' must be one of {', '.join(allowed)}, got {_show(value)}")

    return parse


def _base_path(value: Any, key: str) -> str:
    if isinstance(value, str) and _BASE_PATH.fullmatch(value):
        return value
    raise _config_error(f"Key '{key}' must be a URL path starting with '/', got {_show(value)}")


def _flag(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _config_error(f"Key '{key}' must be true or false, got {_show(value)}")


def _strings(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise _config_error(f"Key '{key}' must be a list of strings, got {_show(value)}")
    items = []
    for item in value:
        if not (isinstance(item, str) or _is_number(item)):
            raise _config_error(
                f"Key '{key}' must be a list of strings, got an item that is {_show(item)}"
            )
        items.append(str(item))
    return items


def _whole(value: Any) -> int | None:
    """Return value as an int when it is one or a short string of ASCII digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value) if len(value) <= 18 else None
    return None


def _integer(low: int, high: int) -> Callable[[Any, str], int]:
    def parse(value: Any, key: str) -> int:
        number = _whole(value)
        if number is None or not low <= number <= high:
            raise _config_error(
                f"Key '{key}' must be an integer between {low} and {high}, got {_show(value)}"
            )
        return number

    return parse


def _version(shape: re.Pattern, example: str) -> Callable[[Any, str], str]:
    def parse(value: Any, key: str) -> str:
        text = str(value) if _is_number(value) else value
        if isinstance(text, str) and len(text) <= 64 and shape.fullmatch(text.strip()):
            return text.strip()
        raise _config_error(
            f"Key '{key}' must be a version such as '{example}', got {_show(value)}",
            f'Quote the version in README.md, e.g. {key}: "{example}"',
        )

    return parse


def _duration(value: Any, key: str) -> int:
    seconds = _whole(value)
    match = _DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
    if seconds is None and match and value.strip():
        hours, minutes, secs = (int(part or 0) for part in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if seconds is None or seconds <= 0:
        raise _config_error(
            f"Key '{key}' must be a duration such as '30m', '1h' or '90s', got {_show(value)}"
        )
    return seconds


def _headers(value: Any, key: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _config_error(
            f"Key '{key}' must be a mapping of header names to values, got {_show(value)}"
        )
    headers = {}
    for name, header_value in value.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise _config_error(f"Key '{key}' has an invalid header name {_show(name)}")
        if _is_number(header_value):
            header_value = str(header_value)
        if not isinstance(header_value, str):
            raise _config_error(
                f"Key '{key}' must map {name!r} to a string, got {_show(header_value)}"
            )
        if any(char in header_value for char in "\r\n\x00"):
            raise _config_error(f"Key '{key}' has a line break or NUL in header {name!r}")
        headers[name] = header_value
    return headers


def _app_file(value: Any, key: str) -> str:
    problem = "must be a path" if not isinstance(value, str) else _app_file_problem(value)
    if problem:
        raise _config_error(
            f"Key '{key}' {problem}, got {_show(value)}",
            "Give a path relative to the repository root, such as 'app.py' or 'src/app.py'",
        )
    return value


def _app_file_problem(name: str) -> str | None:
    """Say why app_file cannot name a file inside the checkout, or return None."""
    if not name.strip():
        return "must not be empty"
    if "\\" in name or any(ord(char) < 32 or ord(char) == 127 for char in name):
        return "must not contain backslashes or control characters"
    if name.startswith("/"):
        return "must be a path relative to the repository, not an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "must not contain '..' (it must stay inside the repository)"
    return None


# Every documented key, in Hugging Face's spelling, with the function that checks it.
_PARSERS: dict[str, Callable[[Any, str], Any]] = {
    "sdk": _choice(*SDKS),
    "sdk_version": _version(_SDK_VERSION, "5.9.1"),
    "python_version": _version(_PYTHON_VERSION, "3.10"),
    "app_file": _app_file,
    "app_port": _integer(1, 65535),
    "base_path": _base_path,
    "header": _choice("default", "mini"),
    "hf_oauth_expiration_minutes": _integer(1, _OAUTH_MAX_MINUTES),
    "startup_duration_timeout": _duration,
    "custom_headers": _headers,
    **dict.fromkeys("fullWidth pinned hf_oauth disable_embedding".split(), _flag),
    **dict.fromkeys(
        "models datasets tags hf_oauth_scopes hf_oauth_authorized_org preload_from_hub".split(),
        _strings,
    ),
    **dict.fromkeys(
        "title emoji colorFrom colorTo short_description thumbnail license".split(), _text
    ),
    **dict.fromkeys("suggested_hardware suggested_storage".split(), _text),
}


# The card colours Hugging Face accepts; the portal's stylesheet has one --c-NAME for each.
CARD_COLORS = ("red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray")


def _drop_unknown_colors(values: dict[str, Any]) -> list[str]:
    """Drop a colorFrom/colorTo outside CARD_COLORS (it would reach a style attribute) and
    return a warning for each: Spaces ignore a bad card colour, so the Space still builds."""
    warnings = []
    for attribute in ("color_from", "color_to"):
        if attribute not in values:
            continue
        given = values.pop(attribute)
        if given.lower() in CARD_COLORS:
            values[attribute] = given.lower()
        else:
            warnings.append(f"{_HF_NAMES[attribute]} {_show(given)} is not a card colour and "
                            f"is ignored (use one of: {', '.join(CARD_COLORS)})")
    return warnings


def _plain(value: Any, key: str) -> Any:
    """Return an unknown key's value as JSON-ready data, refusing alias bombs and cycles."""
    remaining = [_MAX_NODES]

    def walk(item: Any, depth: int) -> Any:
        remaining[0] -= 1
        if remaining[0] < 0 or depth > _MAX_DEPTH:
            raise _config_error(
                f"Key '{key}' is too large or nested too deeply (recursive YAML aliases?)"
            )
        if isinstance(item, dict):
            return {
                name if isinstance(name, str) else str(name): walk(child, depth + 1)
                for name, child in item.items()
            }
        if isinstance(item, list | tuple | set):
            return [walk(child, depth + 1) for child in item]
        if isinstance(item, datetime.date):
            return item.isoformat()
        if isinstance(item, str | int | float | bool) or item is None:
            return item
        return str(item)

    return walk(value, 0)
