"""Check a Streamlit Space the way a browser does: run its script and report what it raised.

Streamlit answers `/_stcore/health` and `/` with 200 even when the user's script raises on every
run, because it runs the script only for a browser session on its WebSocket
(`/_stcore/stream`). This probe opens that WebSocket, asks for a run with a `BackMsg`
`rerun_script`, and reads `ForwardMsg`s until `script_finished`: an `exception` element in a
delta (an uncaught exception, which the browser shows as a red box) or a compile error
(`session_event.script_compilation_exception`) is reported, as is a run that does not finish
within the timeout.

The protobuf messages are hand-encoded and decoded: the probe needs a dozen field numbers, not
Streamlit's generated code (which pins a protobuf runtime). The numbers are those of the
descriptors in Streamlit 1.40.1's streamlit/proto/*_pb2.py; protobuf's compatibility rules keep
a field number's meaning across releases. Only this module imports `websocket` (websocket-client).
"""

from __future__ import annotations

import re
import time
from typing import Any

import websocket

# BackMsg.rerun_script (a ClientState) and ClientState.page_name.
BACK_RERUN_SCRIPT = 11
CLIENT_STATE_PAGE_NAME = 4
# ForwardMsg's oneof `type`: new_session, delta, script_finished (an enum), session_event.
FORWARD_NEW_SESSION = 4
FORWARD_DELTA = 5
FORWARD_SCRIPT_FINISHED = 6
FORWARD_SESSION_EVENT = 10
NEW_SESSION_INITIALIZE = 1
INITIALIZE_SESSION_ID = 6
DELTA_NEW_ELEMENT = 3
ELEMENT_EXCEPTION = 8
SESSION_EVENT_COMPILATION_EXCEPTION = 3
EXCEPTION_TYPE = 1
EXCEPTION_MESSAGE = 2
EXCEPTION_IS_WARNING = 5
# ForwardMsg.ScriptFinishedStatus
FINISHED_SUCCESSFULLY = 0
FINISHED_WITH_COMPILE_ERROR = 1
FINISHED_EARLY_FOR_RERUN = 2
FINISHED_FRAGMENT_RUN_SUCCESSFULLY = 3

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5
STREAM_PATHS = ("_stcore/stream", "stream")  # "stream": older Streamlit releases
MESSAGE_LIMIT = 300  # characters of an exception message kept in the report
CLOSE_WAIT = 0.5  # seconds to wait for the server's close frame
APP_DIR = "/home/user/app/"  # where builds put a Space's files, trimmed from file names

# The last probe's Streamlit session per socket. The next probe reconnects to it, as a browser
# tab does, because Streamlit keeps every disconnected session (with its st.session_state) for
# two minutes: a new session per probe would keep a dozen alive per Space at the default
# interval. An unknown id (the container restarted) just gets a new session.
_sessions: dict[tuple[str, int, str], str] = {}


def encode_varint(value: int) -> bytes:
    """Encode a non-negative integer as a protobuf base-128 varint."""
    if value < 0:
        raise ValueError(f"cannot encode {value}: only non-negative varints are used here")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_field(number: int, value: int | bytes | str) -> bytes:
    """Encode one field: an int as a varint, bytes or str as length-delimited."""
    if isinstance(value, int):
        return encode_varint(number << 3 | VARINT) + encode_varint(value)
    data = value.encode() if isinstance(value, str) else value
    return encode_varint(number << 3 | LENGTH_DELIMITED) + encode_varint(len(data)) + data


def decode_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Read a varint at pos; return it and the position after it."""
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint longer than 10 bytes")


def decode_fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """Split a protobuf message into (field number, value) pairs in wire order.

    Varints and fixed-width fields come back as ints, length-delimited ones as bytes (a
    string, bytes, a packed list or a sub-message: the caller knows which).
    """
    fields: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = decode_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire_type == VARINT:
            value, pos = decode_varint(data, pos)
            fields.append((number, value))
        elif wire_type in (FIXED64, FIXED32):
            size = 8 if wire_type == FIXED64 else 4
            if pos + size > len(data):
                raise ValueError("truncated fixed-width field")
            fields.append((number, int.from_bytes(data[pos:pos + size], "little")))
            pos += size
        elif wire_type == LENGTH_DELIMITED:
            size, pos = decode_varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated length-delimited field")
            fields.append((number, data[pos:pos + size]))
            pos += size
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
    return fields


def _field(data: bytes, number: int) -> Any:
    """Return the last value of a field (protobuf's rule for a repeated singular), or None."""
    found = None
    for field_number, value in decode_fields(data):
        if field_number == number:
            found = value
    return found


def rerun_script_message(page_name: str = "") -> bytes:
    """Encode the BackMsg a browser sends to run the script (of one page, when named)."""
    client_state = encode_field(CLIENT_STATE_PAGE_NAME, page_name) if page_name else b""
    return encode_field(BACK_RERUN_SCRIPT, client_state)


def _exception(data: bytes) -> tuple[str, str] | None:
    """Read an Exception message; None for a warning (the app still runs)."""
    if _field(data, EXCEPTION_IS_WARNING):
        return None
    kind = _field(data, EXCEPTION_TYPE)
    message = _field(data, EXCEPTION_MESSAGE)
    return (kind.decode(errors="replace") if isinstance(kind, bytes) else "an exception",
            message.decode(errors="replace") if isinstance(message, bytes) else "")


def read_forward_msg(data: bytes) -> tuple[str, Any]:
    """Tell what one ForwardMsg says that matters to a health check.

    Returns ("finished", status), ("exception", (type, message)), ("session", session id)
    or ("other", None).
    """
    for number, value in decode_fields(data):
        if number == FORWARD_NEW_SESSION and isinstance(value, bytes):
            initialize = _field(value, NEW_SESSION_INITIALIZE)
            session = _field(initialize, INITIALIZE_SESSION_ID) \
                if isinstance(initialize, bytes) else None
            if isinstance(session, bytes):
                return "session", session.decode(errors="replace")
        if number == FORWARD_SCRIPT_FINISHED and isinstance(value, int):
            return "finished", value
        if number == FORWARD_DELTA and isinstance(value, bytes):
            element = _field(value, DELTA_NEW_ELEMENT)
            exception = _field(element, ELEMENT_EXCEPTION) if isinstance(element, bytes) else None
            if isinstance(exception, bytes) and (found := _exception(exception)):
                return "exception", found
        if number == FORWARD_SESSION_EVENT and isinstance(value, bytes):
            exception = _field(value, SESSION_EVENT_COMPILATION_EXCEPTION)
            if isinstance(exception, bytes) and (found := _exception(exception)):
                return "exception", found
    return "other", None


def describe_exception(kind: str, message: str) -> str:
    """Say in one line what the script raised, as the browser's red box would."""
    lines = message.strip().splitlines()
    where = re.fullmatch(r'File "(.+)", line (\d+)', lines[0].strip()) if lines else None
    if where and len(lines) > 1 and lines[-1].startswith(f"{kind}: "):
        # A SyntaxError comes as Python prints it: the file, the line, a caret, the error.
        name = where[1].removeprefix(APP_DIR)
        return (f"the script does not compile: {lines[-1]} ({name}, line {where[2]})")
    text = " ".join(message.split())
    if len(text) > MESSAGE_LIMIT:
        text = text[:MESSAGE_LIMIT - 1] + "…"
    return f"the script raised {kind}: {text}" if text else f"the script raised {kind}"


def _candidates(base_path: str) -> list[tuple[str, str]]:
    """List (WebSocket path, page name) pairs to try, most specific first, as the browser does.

    The appliance never sets Streamlit's server.baseUrlPath, so the socket is normally at the
    root and a base_path names a page; a Space that sets baseUrlPath itself serves it below.
    """
    segments = [part for part in (base_path or "/").split("?")[0].split("/") if part]
    found = []
    for keep in range(len(segments), -1, -1):
        prefix = "/" + "".join(f"{part}/" for part in segments[:keep])
        page = "/".join(segments[keep:])
        found += [(prefix + stream, page) for stream in STREAM_PATHS]
    return found


def _connect(host: str, port: int, base_path: str, deadline: float,
             timeout: float) -> tuple[websocket.WebSocket | None, str, str]:
    """Open Streamlit's WebSocket: (socket, page name, its path), or (None, "", the problem)."""
    refused = ""
    for path, page in _candidates(base_path):
        url = f"ws://{host}:{port}{path}"
        # Streamlit's browser client offers "streamlit", an auth token slot, and the session
        # to resume; the server echoes the first. A loopback probe never goes through a proxy.
        offer = ["streamlit", "PLACEHOLDER_AUTH_TOKEN"]
        if session := _sessions.get((host, port, path)):
            offer.append(session)
        try:
            ws = websocket.create_connection(
                url, timeout=max(deadline - time.monotonic(), 0.01), subprotocols=offer,
                http_no_proxy=[host])
        except websocket.WebSocketBadStatusException as exc:
            refused = refused or f"{url} answered HTTP {exc.status_code} instead of a WebSocket"
            continue
        except (websocket.WebSocketTimeoutException, TimeoutError):
            return None, "", f"no answer at {url} within {timeout:g} s"
        except (OSError, websocket.WebSocketException) as exc:
            return None, "", f"no answer at {url} ({exc.__class__.__name__})"
        return ws, page, path
    return None, "", f"Streamlit's WebSocket did not open: {refused}"


def _next_message(ws: websocket.WebSocket, deadline: float) -> tuple[str, Any]:
    """Wait for the next ForwardMsg that matters; ("timeout", None) or ("closed", why) too."""
    while (remaining := deadline - time.monotonic()) > 0:
        ws.settimeout(remaining)
        try:
            # Control frames come back too: Streamlit pings every second, and a receive that
            # answered pings by itself would never time out while the script runs.
            opcode, data = ws.recv_data(control_frame=True)
        except websocket.WebSocketTimeoutException:
            break
        except (OSError, websocket.WebSocketException) as exc:
            return "closed", f"the WebSocket broke before the script finished " \
                             f"({exc.__class__.__name__})"
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return "closed", "Streamlit closed the WebSocket before the script finished"
        if opcode != websocket.ABNF.OPCODE_BINARY:
            continue
        try:
            what, value = read_forward_msg(data)
        except ValueError:
            continue  # not a message this probe needs; a browser would not fail on it either
        if what != "other":
            return what, value
    return "timeout", None


def _watch_run(ws: websocket.WebSocket, key: tuple[str, int, str], deadline: float,
               timeout: float) -> str | None:
    raised: tuple[str, str] | None = None
    while True:
        what, value = _next_message(ws, deadline)
        if what == "session":
            _sessions[key] = value
        elif what == "exception":
            raised = raised or value
        elif what == "finished" and value != FINISHED_EARLY_FOR_RERUN:
            if raised:
                return describe_exception(*raised)
            if value != FINISHED_WITH_COMPILE_ERROR:
                return None
            # The compile error itself follows script_finished, as a session_event.
            what, value = _next_message(ws, deadline)
            return describe_exception(*value) if what == "exception" \
                else "the script does not compile"
        elif what in ("closed", "timeout"):
            if raised:
                return describe_exception(*raised)
            return value or f"the script did not finish within {timeout:g} s"


def probe_streamlit(host: str, port: int, base_path: str, timeout: float) -> str | None:
    """Return None when a browser session's run of the script finishes cleanly, else why not."""
    deadline = time.monotonic() + timeout
    ws = None
    try:
        ws, page, path_or_problem = _connect(host, port, base_path, deadline, timeout)
        if ws is None:
            return path_or_problem
        ws.send_binary(rerun_script_message(page))
        return _watch_run(ws, (host, port, path_or_problem), deadline, timeout)
    except Exception as exc:  # noqa: BLE001 - a probe reports, it never raises
        return f"the Streamlit check failed ({exc.__class__.__name__}: {exc})"
    finally:
        if ws is not None:
            try:
                ws.close(timeout=CLOSE_WAIT)
            except Exception:  # noqa: BLE001, S110 - the answer is already known
                pass
