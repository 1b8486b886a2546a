"""The Streamlit probe's protobuf wire code against messages recorded from a real Streamlit
1.40.1, and the probe itself against a replaying WebSocket server (the real thing is in
test_podman_health_streamlit.py)."""

from __future__ import annotations

import base64
import hashlib
import http.server
import socket
import struct
import threading
import time

import pytest

from appliance.upkeep import health_streamlit as hs
from appliance.upkeep.health_streamlit import probe_streamlit

# ForwardMsgs a real Streamlit 1.40.1 sent (tests/test_podman_health_streamlit.py's Space):
# a run of `st.write('ok')`, of `st.write('hello'); x`, and of a page reading `x = = 1`.
NEW_SESSION = bytes.fromhex(
    "0a2066346236643535353163356137666131396630356539316432326561663666331200229e030a92010a4c"
    "0a2462306264636563392d386565652d356530332d623439362d3739643265393639383665372a2462306264"
    "636563392d386565652d356530332d623439362d3739643265393639383665371a180a06312e34302e31120e"
    "332e31312e322e66696e616c2e3022021001322433633938616635362d336561312d346130352d393738612d"
    "373764663166363833363234122430383034396235332d663338382d343363632d626630662d373361333362"
    "3663383038641a0361707022066170702e7079320418022801422c0a20336634316535343638393364633634"
    "623731616161636164313263616438313512036170703203617070422c0a2061353063636439386534346562"
    "6163386263666166326635626537653165353812036261643203626164422e0a203232666433653966363162"
    "66306135663634646664316134323266346138366412047479706f32047479706f4a20336634316535343638"
    "39336463363462373161616163616431326361643831355a2033663431653534363839336463363462373161"
    "61616361643132636164383135")

SCRIPT_IS_RUNNING = bytes.fromhex(
    "0a20613431633433383335373262653866316230626365363232323163623638666312004a021001")

MARKDOWN_DELTA = bytes.fromhex(
    "0a20646431633937353730366166323333363236383439356337333061303139323312261202000022203366"
    "3431653534363839336463363462373161616163616431326361643831352a0b1a09ea01060a026f6b2001")

FINISHED_OK = bytes.fromhex(
    "0a20613436633362353466326339383731636438316461663761393332343939633012003000")

EXCEPTION_DELTA = bytes.fromhex(
    "0a20323333353133366130336331373434663537363532333934653464313265663112261202000122206135"
    "3063636439386534346562616338626366616632663562653765316535382ac1031abe0342bb030a094e616d"
    "654572726f7212176e616d6520277827206973206e6f7420646566696e65641ab30146696c6520222f686f6d"
    "652f757365722f2e76656e762f6c69622f707974686f6e332e31312f736974652d7061636b616765732f7374"
    "7265616d6c69742f72756e74696d652f73637269707472756e6e65722f657865635f636f64652e7079222c20"
    "6c696e652038382c20696e20657865635f66756e635f776974685f6572726f725f68616e646c696e670a2020"
    "2020726573756c74203d2066756e6328290a202020202020202020202020205e5e5e5e5e5e1a9f0146696c65"
    "20222f686f6d652f757365722f2e76656e762f6c69622f707974686f6e332e31312f736974652d7061636b61"
    "6765732f73747265616d6c69742f72756e74696d652f73637269707472756e6e65722f7363726970745f7275"
    "6e6e65722e7079222c206c696e65203537392c20696e20636f64655f746f5f657865630a2020202065786563"
    "28636f64652c206d6f64756c652e5f5f646963745f5f291a3d46696c6520222f686f6d652f757365722f6170"
    "702f70616765732f6261642e7079222c206c696e6520332c20696e203c6d6f64756c653e0a2020202078")

FINISHED_COMPILE_ERROR = bytes.fromhex(
    "0a20336139633731363164666434393931656235376565373238353932323162616612003001")

COMPILE_ERROR_EVENT = bytes.fromhex(
    "0a203731333630656633376539636265323835666434336266306464613237353962120052b9071ab6070a0b"
    "53796e7461784572726f72125946696c6520222f686f6d652f757365722f6170702f70616765732f7479706f"
    "2e7079222c206c696e6520310a202078203d203d20310a2020202020205e0a53796e7461784572726f723a20"
    "696e76616c69642073796e7461781aee0146696c6520222f686f6d652f757365722f2e76656e762f6c69622f"
    "707974686f6e332e31312f736974652d7061636b616765732f73747265616d6c69742f72756e74696d652f73"
    "637269707472756e6e65722f7363726970745f72756e6e65722e7079222c206c696e65203530302c20696e20"
    "5f72756e5f7363726970740a20202020636f6465203d2073656c662e5f7363726970745f63616368652e6765"
    "745f62797465636f6465287363726970745f70617468290a20202020202020202020205e5e5e5e5e5e5e5e5e"
    "5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e1ae90146696c652022"
    "2f686f6d652f757365722f2e76656e762f6c69622f707974686f6e332e31312f736974652d7061636b616765"
    "732f73747265616d6c69742f72756e74696d652f73637269707472756e6e65722f7363726970745f63616368"
    "652e7079222c206c696e652037322c20696e206765745f62797465636f64650a2020202066696c65626f6479"
    "203d206d616769632e6164645f6d616769632866696c65626f64792c207363726970745f70617468290a2020"
    "202020202020202020202020205e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e"
    "5e5e5e5e5e5e5e1ad30146696c6520222f686f6d652f757365722f2e76656e762f6c69622f707974686f6e33"
    "2e31312f736974652d7061636b616765732f73747265616d6c69742f72756e74696d652f7363726970747275"
    "6e6e65722f6d616769632e7079222c206c696e652034362c20696e206164645f6d616769630a202020207472"
    "6565203d206173742e706172736528636f64652c207363726970745f706174682c20226578656322290a2020"
    "2020202020202020205e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e"
    "5e1a980146696c6520222f7573722f6c69622f707974686f6e332e31312f6173742e7079222c206c696e6520"
    "35302c20696e2070617273650a2020202072657475726e20636f6d70696c6528736f757263652c2066696c65"
    "6e616d652c206d6f64652c20666c6167732c0a20202020202020202020205e5e5e5e5e5e5e5e5e5e5e5e5e5e"
    "5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e")
# BackMsgs made by Streamlit's own BackMsg_pb2: rerun_script with an empty ClientState, and
# with page_name "bad".
RERUN = bytes.fromhex("5a00")
RERUN_PAGE_BAD = bytes.fromhex("5a052203626164")
SYNTAX_ERROR_MESSAGE = ('File "/home/user/app/pages/typo.py", line 1\n  x = = 1\n      ^\n'
                        "SyntaxError: invalid syntax")
SESSION_ID = "3c98af56-3ea1-4a05-978a-77df1f683624"


# -- the wire format --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**32, 2**63])
def test_varints_round_trip(value):
    encoded = hs.encode_varint(value)
    assert hs.decode_varint(encoded + b"\xff", 0) == (value, len(encoded))


def test_varints_encode_as_protobuf_does():
    assert hs.encode_varint(1) == b"\x01"
    assert hs.encode_varint(300) == b"\xac\x02"


def test_rerun_script_is_encoded_byte_for_byte_as_streamlits_own_code_does():
    assert hs.rerun_script_message() == RERUN
    assert hs.rerun_script_message("bad") == RERUN_PAGE_BAD


def test_decoding_splits_a_recorded_message_into_its_fields():
    # ForwardMsg: hash (1, a 32-character hex digest), metadata (2, empty), script_finished
    # (6, the enum, present although 0 because it is in a oneof).
    fields = hs.decode_fields(FINISHED_OK)
    assert [number for number, _ in fields] == [1, 2, 6]
    assert len(fields[0][1]) == 32 and fields[1][1] == b"" and fields[2][1] == 0


def test_decoding_reads_fixed_width_fields():
    data = bytes([1 << 3 | 1]) + (7).to_bytes(8, "little") + bytes([2 << 3 | 5]) + b"\x02\0\0\0"
    assert hs.decode_fields(data) == [(1, 7), (2, 2)]


@pytest.mark.parametrize("broken", [
    b"\x0a\x05abc",          # length past the end
    b"\x08",                 # varint missing
    b"\x08" + b"\xff" * 11,  # varint that never ends
    b"\x0b",                 # a group (wire type 3), which proto3 never sends
    b"\x00\x01",             # field number 0
    b"\x0d\x01\x02",         # fixed32 cut short
])
def test_decoding_rejects_broken_messages(broken):
    with pytest.raises(ValueError):
        hs.decode_fields(broken)


@pytest.mark.parametrize("message, expected", [
    (NEW_SESSION, ("session", SESSION_ID)),
    (SCRIPT_IS_RUNNING, ("other", None)),
    (MARKDOWN_DELTA, ("other", None)),
    (EXCEPTION_DELTA, ("exception", ("NameError", "name 'x' is not defined"))),
    (FINISHED_OK, ("finished", hs.FINISHED_SUCCESSFULLY)),
    (FINISHED_COMPILE_ERROR, ("finished", hs.FINISHED_WITH_COMPILE_ERROR)),
    (COMPILE_ERROR_EVENT, ("exception", ("SyntaxError", SYNTAX_ERROR_MESSAGE))),
])
def test_recorded_forward_msgs_are_read_for_what_matters(message, expected):
    assert hs.read_forward_msg(message) == expected


def test_an_exception_marked_as_a_warning_is_not_a_failure():
    warning = hs.encode_field(1, "DeprecationWarning") + hs.encode_field(5, 1)
    element = hs.encode_field(hs.ELEMENT_EXCEPTION, warning)
    delta = hs.encode_field(hs.FORWARD_DELTA, hs.encode_field(hs.DELTA_NEW_ELEMENT, element))
    assert hs.read_forward_msg(delta) == ("other", None)


def test_exceptions_are_described_in_one_line():
    assert hs.describe_exception("NameError", "name 'x' is not defined") == \
        "the script raised NameError: name 'x' is not defined"
    assert hs.describe_exception("KeyError", "") == "the script raised KeyError"
    assert hs.describe_exception("ValueError", "a\n  b") == "the script raised ValueError: a b"
    long = hs.describe_exception("ValueError", "x" * 1000)
    assert len(long) < 400 and long.endswith("…")
    assert hs.describe_exception(*hs.read_forward_msg(COMPILE_ERROR_EVENT)[1]) == \
        "the script does not compile: SyntaxError: invalid syntax (pages/typo.py, line 1)"


def test_a_base_path_is_tried_as_a_served_prefix_then_as_a_page():
    assert hs._candidates("/") == [("/_stcore/stream", ""), ("/stream", "")]
    assert [c for c in hs._candidates("/app/bad") if c[0].endswith("_stcore/stream")] == [
        ("/app/bad/_stcore/stream", ""), ("/app/_stcore/stream", "bad"),
        ("/_stcore/stream", "app/bad")]


# -- the probe against a server replaying Streamlit's answers ----------------------------------

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _frame(opcode: int, payload: bytes) -> bytes:
    head = bytes([0x80 | opcode])
    if len(payload) < 126:
        return head + bytes([len(payload)]) + payload
    return head + bytes([126]) + struct.pack("!H", len(payload)) + payload


def _read_frame(conn: socket.socket) -> tuple[int, bytes]:
    def exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    first, second = exactly(2)
    size = second & 0x7F
    if size == 126:
        size = struct.unpack("!H", exactly(2))[0]
    elif size == 127:
        size = struct.unpack("!Q", exactly(8))[0]
    mask = exactly(4) if second & 0x80 else b"\0\0\0\0"
    return first & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(exactly(size)))


class ReplayServer:
    """A WebSocket server at one path that answers each connection as Streamlit did: it reads
    the BackMsg, sends recorded ForwardMsgs, then pings until the client closes ("hold") or
    closes itself ("close"). Any other path gets 404, as a non-Streamlit server would."""

    def __init__(self, messages: list[bytes], then: str = "hold", path: str = "/_stcore/stream",
                 handshake: bool = True):
        self.messages, self.then, self.path, self.handshake = messages, then, path, handshake
        self.requests: list[dict] = []  # per upgrade: the path, subprotocols and BackMsg
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                try:
                    self._answer(conn)
                except (OSError, EOFError):
                    pass

    def _answer(self, conn: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        if not self.handshake:
            self.closed.wait(120)  # silent until the test ends: a probe must give up itself
            return
        lines = request.decode().split("\r\n")
        path = lines[0].split()[1]
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if path != self.path:
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return
        accept = base64.b64encode(hashlib.sha1((headers["sec-websocket-key"] + GUID).encode())
                                  .digest()).decode()
        conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
                      "Sec-WebSocket-Protocol: streamlit\r\n\r\n").encode())
        opcode, back_msg = _read_frame(conn)
        self.requests.append({"path": path, "back_msg": back_msg, "protocols": [
            p.strip() for p in headers.get("sec-websocket-protocol", "").split(",")]})
        for message in self.messages:
            conn.sendall(_frame(0x2, message))
        if self.then == "close":
            conn.sendall(_frame(0x8, struct.pack("!H", 1000)))
            return
        # Streamlit's Tornado pings every second (websocket_ping_interval); ping faster here.
        conn.settimeout(0.05)
        # Held until the test ends (at most 120 s): a probe that ignores its timeout hangs.
        held_until = time.monotonic() + 120
        while time.monotonic() < held_until and not self.closed.is_set():
            try:
                if _read_frame(conn)[0] == 0x8:
                    break
            except TimeoutError:
                conn.sendall(_frame(0x9, b""))
        conn.sendall(_frame(0x8, struct.pack("!H", 1000)))

    def close(self) -> None:
        self.closed.set()
        self.listener.close()


@pytest.fixture
def replay():
    servers = []

    def start(*args, **kwargs) -> ReplayServer:
        servers.append(ReplayServer(*args, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


RUN_OK = [NEW_SESSION, SCRIPT_IS_RUNNING, MARKDOWN_DELTA, FINISHED_OK]
RUN_RAISES = [NEW_SESSION, SCRIPT_IS_RUNNING, MARKDOWN_DELTA, EXCEPTION_DELTA, FINISHED_OK]


def test_a_clean_run_is_healthy_and_was_asked_for_as_a_browser_does(replay):
    server = replay(RUN_OK)
    assert probe_streamlit("127.0.0.1", server.port, "/", 2) is None
    assert server.requests[0]["back_msg"] == RERUN
    assert server.requests[0]["protocols"][0] == "streamlit"


def test_a_script_that_raises_is_reported_with_its_exception(replay):
    server = replay(RUN_RAISES)
    assert probe_streamlit("127.0.0.1", server.port, "/", 2) == \
        "the script raised NameError: name 'x' is not defined"


def test_a_script_that_does_not_compile_is_reported_with_the_line(replay):
    server = replay([NEW_SESSION, SCRIPT_IS_RUNNING, FINISHED_COMPILE_ERROR, COMPILE_ERROR_EVENT])
    assert probe_streamlit("127.0.0.1", server.port, "/", 2) == \
        "the script does not compile: SyntaxError: invalid syntax (pages/typo.py, line 1)"


def test_a_run_cut_short_for_a_rerun_waits_for_the_rerun(replay):
    early = hs.encode_field(hs.FORWARD_SCRIPT_FINISHED, hs.FINISHED_EARLY_FOR_RERUN)
    server = replay([NEW_SESSION, early, SCRIPT_IS_RUNNING, EXCEPTION_DELTA, FINISHED_OK])
    assert probe_streamlit("127.0.0.1", server.port, "/", 2) == \
        "the script raised NameError: name 'x' is not defined"


def test_a_run_that_never_finishes_is_reported_within_the_timeout(replay):
    server = replay([NEW_SESSION, SCRIPT_IS_RUNNING, b"\xff\xff not protobuf"])
    began = time.monotonic()
    assert probe_streamlit("127.0.0.1", server.port, "/", 0.5) == \
        "the script did not finish within 0.5 s"
    # Liveness bound: the probe gives up after its 0.5 s and CLOSE_WAIT (about 1 s in all);
    # the server never finishes, so a probe that ignored its timeout would never return.
    assert time.monotonic() - began < 10 * (0.5 + hs.CLOSE_WAIT)


def test_an_exception_is_reported_even_when_the_run_then_hangs(replay):
    server = replay([NEW_SESSION, EXCEPTION_DELTA])
    began = time.monotonic()
    assert probe_streamlit("127.0.0.1", server.port, "/", 0.5) == \
        "the script raised NameError: name 'x' is not defined"
    # Liveness bound: the probe gives up after its 0.5 s and CLOSE_WAIT (about 1 s in all);
    # the server never finishes, so a probe that ignored its timeout would never return.
    assert time.monotonic() - began < 10 * (0.5 + hs.CLOSE_WAIT)


def test_a_socket_closed_mid_run_is_reported(replay):
    server = replay([NEW_SESSION, SCRIPT_IS_RUNNING], then="close")
    assert probe_streamlit("127.0.0.1", server.port, "/", 2) == \
        "Streamlit closed the WebSocket before the script finished"


def test_the_next_probe_resumes_the_last_probes_session(replay):
    server = replay(RUN_OK)
    assert probe_streamlit("127.0.0.1", server.port, "/", 2) is None
    assert probe_streamlit("127.0.0.1", server.port, "/", 2) is None
    first, second = (r["protocols"] for r in server.requests)
    assert len(first) == 2 and second[2] == SESSION_ID


def test_a_base_path_naming_a_page_runs_that_page(replay):
    server = replay(RUN_OK)
    assert probe_streamlit("127.0.0.1", server.port, "/bad", 2) is None
    assert server.requests[0]["back_msg"] == RERUN_PAGE_BAD


def test_a_base_path_served_by_streamlit_itself_is_used(replay):
    server = replay(RUN_OK, path="/sub/_stcore/stream")
    assert probe_streamlit("127.0.0.1", server.port, "/sub/", 2) is None
    assert server.requests[0]["back_msg"] == RERUN


def test_an_older_streamlit_is_reached_at_its_old_path(replay):
    server = replay(RUN_OK, path="/stream")
    assert probe_streamlit("127.0.0.1", server.port, "/", 2) is None


def test_a_server_without_streamlits_websocket_is_reported(replay):
    server = replay(RUN_OK, path="/elsewhere")
    assert probe_streamlit("127.0.0.1", server.port, "/", 2) == (
        f"Streamlit's WebSocket did not open: ws://127.0.0.1:{server.port}/_stcore/stream "
        "answered HTTP 404 instead of a WebSocket")


def test_a_plain_http_app_is_reported_without_a_websocket():
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        port = server.server_address[1]
        assert probe_streamlit("127.0.0.1", port, "/", 2) == (
            f"Streamlit's WebSocket did not open: ws://127.0.0.1:{port}/_stcore/stream "
            "answered HTTP 200 instead of a WebSocket")
    finally:
        server.shutdown()
        server.server_close()


def test_nothing_listening_is_reported():
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
    assert probe_streamlit("127.0.0.1", port, "/", 1) == \
        f"no answer at ws://127.0.0.1:{port}/_stcore/stream (ConnectionRefusedError)"


def test_a_server_that_never_completes_the_handshake_is_reported_within_the_timeout(replay):
    server = replay([], handshake=False)
    began = time.monotonic()
    assert probe_streamlit("127.0.0.1", server.port, "/", 0.5) == \
        f"no answer at ws://127.0.0.1:{server.port}/_stcore/stream within 0.5 s"
    # Liveness bound: about 0.5 s expected; the server stays silent for 120 s.
    assert time.monotonic() - began < 10 * (0.5 + hs.CLOSE_WAIT)


@pytest.mark.parametrize("host, port, base_path", [
    ("127.0.0.1", 70000, "/"), ("", 1, "/"), ("127.0.0.1", 1, None), ("no host here", 1, "/")])
def test_the_probe_never_raises(host, port, base_path):
    assert isinstance(probe_streamlit(host, port, base_path, 0.5), str)
