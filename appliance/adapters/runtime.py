"""Rootless Podman through podman-py (the only module importing podman): build, run, inspect."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pwd
import re
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import podman
import podman.errors
import requests

from ..errors import BuildFailed, InvalidInput, RuntimeUnavailable
from . import host

LABEL_SPACE = "appliance.space"
LABEL_REVISION = "appliance.revision"
LABEL_ROLE = "appliance.role"
LABEL_INSTANCE = "appliance.instance"
DEFAULT_DATA_DIR = "/var/lib/appliance"
# Offline Spaces (from a bundle) each run on an internal network of their own: no route out,
# no way to another Space, while rootlessport still publishes their port on 127.0.0.1.
# (Before, they shared one, "appliance-offline", with the same role and no Space label:
# housekeeping removes it as an orphan once nothing runs on it.)
ROLE_OFFLINE_NETWORK = "offline-network"
# What Podman answers when a build's layer-cache lookup meets an image removed meanwhile.
LOST_LAYER = "layer not known"


@dataclass(frozen=True)
class ContainerState:
    name: str
    status: str  # created, running, exited, ...
    exit_code: int | None
    labels: dict[str, str]

    @property
    def running(self) -> bool:
        return self.status == "running"


def _api_error_text(exc: Exception) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc).strip()


def _container_gone(exc: Exception) -> bool:
    """Tell whether Podman failed because the container went meanwhile (another process
    removed it between our lookup and our call: Podman answers 500, not 404, then)."""
    return "no such container" in _api_error_text(exc)


class Runtime:
    """The service account's Podman, reached over its API socket."""

    def __init__(self, config):
        self.config = config
        self.url = config.podman_socket_url
        self._client: podman.PodmanClient | None = None

    # -- connection ----------------------------------------------------------------------

    @property
    def client(self) -> podman.PodmanClient:
        if self._client is None:
            self._client = self._connect()
        return self._client

    def _socket_path(self) -> Path | None:
        return Path(self.url[len("unix://"):]) if self.url.startswith("unix://") else None

    def _connect(self) -> podman.PodmanClient:
        client = podman.PodmanClient(base_url=self.url, timeout=300)
        try:
            client.ping()
            return client
        except (podman.errors.APIError, requests.RequestException, OSError):
            pass
        if self.config.podman_autostart and self._start_service():
            return client
        raise RuntimeUnavailable(
            f"Cannot reach Podman at {self.url}",
            hint="run 'appliance doctor' for the fix (the Podman API service of the "
            f"{self.config.service_user} account must be running)",
        )

    def _start_service(self) -> bool:
        """Start `podman system service` as the service account; True once it answers."""
        sock = self._socket_path()
        try:
            account = pwd.getpwnam(self.config.service_user)
        except KeyError:
            return False
        if sock is None or os.geteuid() not in (0, account.pw_uid):
            return False
        runtime_dir = f"/run/user/{account.pw_uid}"
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": account.pw_dir,
               "XDG_RUNTIME_DIR": runtime_dir}
        command = ["podman", "system", "service", "--time=0", self.url]
        if os.geteuid() == 0:
            os.makedirs(runtime_dir, mode=0o700, exist_ok=True)
            os.chown(runtime_dir, account.pw_uid, account.pw_gid)
            command = ["runuser", "-u", account.pw_name, "--", "env",
                       *(f"{k}={v}" for k, v in env.items()), *command]
        try:
            subprocess.Popen(command, env=env, cwd="/", stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        except OSError:
            return False
        probe = podman.PodmanClient(base_url=self.url, timeout=5)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                probe.ping()
                return True
            except (podman.errors.APIError, requests.RequestException, OSError):
                time.sleep(0.2)
        return False

    def info(self) -> dict[str, Any]:
        """Describe the Podman behind the socket (version, storage, runtime, cgroups)."""
        try:
            data = self.client.info()
        except (podman.errors.APIError, requests.RequestException) as exc:
            raise RuntimeUnavailable(f"Podman at {self.url} failed: {exc}") from None
        host_info = data.get("host", {})
        return {
            "version": data.get("version", {}).get("Version"),
            "storage_driver": data.get("store", {}).get("graphDriverName"),
            "runtime": host_info.get("ociRuntime", {}).get("name"),
            "cgroup_version": host_info.get("cgroupVersion"),
            "cgroup_manager": host_info.get("cgroupManager"),
            "rootless": host_info.get("security", {}).get("rootless"),
        }

    def limits(self) -> tuple[bool, str]:
        """Tell whether CPU/memory/pids limits can be enforced for this account's containers."""
        try:
            uid = pwd.getpwnam(self.config.service_user).pw_uid
        except KeyError:
            uid = None
        return host.resource_limits_enforceable(uid)

    # -- images --------------------------------------------------------------------------

    def image_exists(self, name: str) -> bool:
        try:
            return self.client.images.exists(name)
        except (podman.errors.APIError, requests.RequestException) as exc:
            raise RuntimeUnavailable(f"Podman at {self.url} failed: {exc}") from None

    def _list_images(self, filters: dict[str, str]) -> list[Any]:
        # Listing inspects each image; one removed meanwhile (by a concurrent build or
        # prune) fails the whole call with "image not known", so list again.
        for attempt in range(3):
            try:
                return self.client.images.list(filters=filters)
            except podman.errors.APIError as exc:
                if "image not known" not in str(exc) or attempt == 2:
                    raise RuntimeUnavailable(
                        f"Podman could not list images: {_api_error_text(exc)}") from None
            except requests.RequestException as exc:
                raise RuntimeUnavailable(f"Podman at {self.url} failed: {exc}") from None
        return []

    def list_images(self, reference: str) -> list[str]:
        """Return the tags matching a reference pattern (e.g. localhost/appliance-python)."""
        tags = {tag for image in self._list_images({"reference": reference})
                for tag in image.tags}
        return sorted(tags)

    def remove_image(self, name: str, force: bool = False) -> None:
        try:
            self.client.images.remove(name, force=force)
        except podman.errors.ImageNotFound:
            pass
        except podman.errors.APIError:
            pass  # still used by a container, or by another tag: keep it

    def load_image(self, tarball: Path) -> list[str]:
        """Load a `podman save` / `docker save` archive; return the loaded names."""
        try:
            data = Path(tarball).read_bytes()
        except OSError as exc:
            raise InvalidInput(f"Cannot read image archive {tarball}: {exc.strerror}") from None
        try:
            images = list(self.client.images.load(data))
        except (podman.errors.APIError, requests.RequestException) as exc:
            raise InvalidInput(
                f"{tarball} is not an image archive Podman can load: {_api_error_text(exc)}",
                hint="make it with 'podman save -o FILE IMAGE' on a machine that has the image",
            ) from None
        return [tag for image in images for tag in image.tags]

    # -- the image store, shared by builds and prunes -------------------------------------

    def _storage_lock_path(self) -> Path:
        return Path(self.config.data_path) / "run" / "podman-storage.lock"

    @contextlib.contextmanager
    def images_in_use(self) -> Iterator[None]:
        """Hold the image store for a build: a prune (in any process) waits for the next
        pass while one runs. Builds share it with each other."""
        with _flock(self._storage_lock_path(), fcntl.LOCK_SH):
            yield

    @contextlib.contextmanager
    def images_alone(self) -> Iterator[bool]:
        """Hold the image store alone for a prune; yield False (holding nothing) while a
        build runs, so that a prune never removes a layer a build is reading."""
        path = self._storage_lock_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
            else:
                yield True
        finally:
            os.close(fd)

    def build(
        self,
        context: dict[str, bytes | Path],
        containerfile: str,
        tag: str,
        labels: dict[str, str],
        buildargs: dict[str, str],
        secrets: dict[str, bytes],
        nocache: bool,
        log: Callable[[str], None],
        timeout: float,
    ) -> str:
        """Build an image from in-memory/on-disk context files; return the image id.

        A build whose cache lookup meets an image removed meanwhile (a deleted Space's, an
        old revision's, a person's `podman rmi`) is tried once more, saying so in its log.
        """
        body = _context_tar(context, secrets)
        with self.images_in_use():
            try:
                return self._build(body, containerfile, tag, labels, buildargs, secrets,
                                   nocache, log, timeout)
            except BuildFailed as exc:
                if LOST_LAYER not in exc.message:
                    raise
                log(f"==> Podman lost a layer this build was reading ({exc.message}): an "
                    "image was removed meanwhile; building once more")
            return self._build(body, containerfile, tag, labels, buildargs, secrets,
                               nocache, log, timeout)

    def _build(self, body: bytes, containerfile: str, tag: str, labels: dict[str, str],
               buildargs: dict[str, str], secrets: dict[str, bytes], nocache: bool,
               log: Callable[[str], None], timeout: float) -> str:
        params = {
            "dockerfile": containerfile, "t": tag, "rm": "true", "layers": "true",
            "labels": json.dumps(labels), "buildargs": json.dumps(buildargs),
            "nocache": "true" if nocache else "false",
            "secrets": json.dumps(
                [f"id={key},src=.appliance-secret-{index}" for index, key in
                 enumerate(sorted(secrets))]
            ),
        }
        lines: list[str] = []
        image_id = None
        deadline = time.monotonic() + timeout
        try:
            response = self.client.api.post(
                "/build", params=params, data=body, stream=True,
                headers={"Content-Type": "application/x-tar"},
            )
        except (podman.errors.APIError, requests.RequestException) as exc:
            raise RuntimeUnavailable(f"Podman at {self.url} refused the build: {exc}") from None
        failure = None
        if response.status_code >= 400:
            failure = _decode_error(response.text)
        else:
            for raw in response.iter_lines():
                if time.monotonic() > deadline:
                    response.close()
                    failure = f"the build took longer than {int(timeout)} s"
                    break
                if not raw:
                    continue
                try:
                    message = json.loads(raw)
                except ValueError:
                    continue
                if message.get("error"):
                    failure = message["error"].strip()
                    log(failure)
                    break
                stream = message.get("stream", "")
                for line in stream.splitlines():
                    log(line)
                    lines.append(line)
                if re.fullmatch(r"[0-9a-f]{64}", stream.strip()):
                    image_id = stream.strip()
        if failure or not image_id:
            raise BuildFailed(failure or "the build ended without producing an image")
        return image_id

    # -- containers ----------------------------------------------------------------------

    def ensure_volume(self, name: str, labels: dict[str, str]) -> None:
        try:
            if not self.client.volumes.exists(name):
                self.client.volumes.create(name, labels=labels)
        except podman.errors.APIError as exc:
            raise RuntimeUnavailable(
                f"Cannot create volume {name}: {_api_error_text(exc)}") from None

    def remove_volume(self, name: str) -> None:
        try:
            self.client.volumes.remove(name, force=True)
        except podman.errors.NotFound:
            pass

    def volume_exists(self, name: str) -> bool:
        return self.client.volumes.exists(name)

    def run(
        self,
        name: str,
        image: str,
        host_port: int,
        container_port: int,
        env: dict[str, str],
        labels: dict[str, str],
        volumes: dict[str, str],
        enforce_limits: bool,
        command: list[str] | None = None,
        devices: list[str] | None = None,
        memory_limit_mib: int | None = None,
        network: str | None = None,
        user: str | None = None,
    ) -> str:
        """Create and start a hardened container publishing container_port on 127.0.0.1.

        devices are CDI names (nvidia.com/gpu=0); memory_limit_mib overrides the Space
        default (a Jetson GPU budget is system memory). network puts it on that Podman network
        (an internal one from ensure_internal_network: no connection out at all, its port
        still published) instead of its own slirp4netns. user runs it as that uid instead of
        the image's USER; the volumes mounted read-write are handed to it (the U option).
        """
        self.remove_container(name)
        kwargs: dict[str, Any] = dict(
            image=image, name=name, detach=True, environment=env,
            labels={**labels, LABEL_INSTANCE: self.config.instance_id},
            ports={f"{container_port}/tcp": ("127.0.0.1", host_port)},
            # "DEST:ro" mounts read-only (the shared model cache of an offline Space); the
            # rest are the Space's own, handed to its user.
            volumes={vol: {"bind": dest.removesuffix(":ro"), "mode": "ro"} if dest.endswith(":ro")
                     else {"bind": dest, "mode": "rw", "extended_mode": ["U"]}
                     for vol, dest in volumes.items()},
            cap_drop=["ALL"], no_new_privileges=True,
            # An app as PID 1 ignores SIGTERM (gradio does), making every stop wait out the
            # 10 s timeout; catatonit as init forwards signals and reaps zombies.
            init=True,
        )
        if command:
            kwargs["command"] = command
        if user:
            kwargs["user"] = user
        if network:
            kwargs.update(network_mode="bridge", networks={network: {}})
        if devices:
            kwargs["devices"] = devices
        if enforce_limits:
            kwargs.update(
                pids_limit=self.config.space_pids_limit,
                mem_limit=f"{memory_limit_mib or self.config.space_memory_mb}m",
                nano_cpus=int(self.config.space_cpus * 1e9),
            )
        try:
            container = self.client.containers.create(**kwargs)
            container.start()
        except podman.errors.ImageNotFound:
            raise RuntimeUnavailable(f"Image {image} is gone from Podman's storage",
                                     hint="rebuild with 'appliance spaces restart --factory'"
                                     ) from None
        except podman.errors.APIError as exc:
            text = _api_error_text(exc)
            self.remove_container(name)
            if "address already in use" in text:
                raise PortInUse(host_port) from None
            if network and "network not found" in text:
                # Podman 4.3 mounts an empty folder over /var/lib in its rootless network
                # namespace when /var/lib/cni is missing, hiding the network configs kept
                # under a home in /var/lib (the service account's /var/lib/appliance).
                raise RuntimeUnavailable(
                    f"Podman could not start {name}: {text}",
                    hint="as root: mkdir -p /var/lib/cni (rootless Podman 4.3 hides /var/lib, "
                    "and the service account's networks with it, when that folder is missing)"
                ) from None
            raise RuntimeUnavailable(f"Podman could not start {name}: {text}") from None
        return container.id

    def ensure_internal_network(self, name: str, labels: dict[str, str]) -> str:
        """Create an internal network unless it exists (labelled, with this instance); return
        its name.

        Internal: its containers have no route out of it. Name resolution is off: aardvark-dns
        would forward queries for outside names, a way out.
        """
        try:
            if not self.client.networks.exists(name):
                try:
                    self.client.networks.create(
                        name, internal=True, dns_enabled=False,
                        labels={**labels, LABEL_INSTANCE: self.config.instance_id})
                except podman.errors.APIError as exc:  # made meanwhile by another process
                    if "already exists" not in _api_error_text(exc):
                        raise
            attrs = self.client.networks.get(name).attrs
        except (podman.errors.APIError, requests.RequestException) as exc:
            raise RuntimeUnavailable(f"Cannot create the network {name}: "
                                     f"{_api_error_text(exc)}") from None
        if not attrs.get("internal") or attrs.get("dns_enabled"):
            raise RuntimeUnavailable(
                f"The Podman network {name} is not internal, or resolves names, so the Space "
                "would reach the outside through it",
                hint=f"remove it ('podman network rm {name}' as the service account, once no "
                "container uses it); the appliance makes it again")
        return name

    def remove_network(self, name: str) -> bool:
        """Remove a network; False when a container still uses it. A missing one is fine."""
        try:
            self.client.networks.remove(name)
        except podman.errors.NotFound:
            pass
        except (podman.errors.APIError, requests.RequestException) as exc:
            text = _api_error_text(exc)
            if "not found" in text or "no such network" in text:
                return True
            if "in use" in text or "associated containers" in text:
                return False
            raise RuntimeUnavailable(f"Cannot remove the network {name}: {text}") from None
        return True

    def labelled_networks(self, role: str) -> dict[str, str]:
        """Map the name of each network of this instance with that role to its Space."""
        try:
            found = self.client.networks.list(filters={"label": f"{LABEL_ROLE}={role}"})
        except (podman.errors.APIError, requests.RequestException) as exc:
            raise RuntimeUnavailable(f"Cannot list networks: {_api_error_text(exc)}") from None
        return {network.name: labels.get(LABEL_SPACE, "") for network in found
                if self._ours(labels := network.attrs.get("labels") or {})}

    def _find(self, name: str):
        """Return the named container, or None when there is none."""
        try:
            return self.client.containers.get(name)
        except podman.errors.NotFound:
            return None
        except (podman.errors.APIError, requests.RequestException) as exc:
            if _container_gone(exc):
                return None
            raise RuntimeUnavailable(f"Podman at {self.url} failed: {exc}") from None

    def state(self, name: str) -> ContainerState | None:
        container = self._find(name)
        if container is None:
            return None
        attrs = container.attrs.get("State", {})
        return ContainerState(
            name=name, status=attrs.get("Status", container.status),
            exit_code=attrs.get("ExitCode"), labels=container.labels or {},
        )

    def logs(self, name: str, tail: int | None = 200) -> str:
        """The container's log: its last `tail` lines, or all of it."""
        try:
            container = self.client.containers.get(name)
            # Read whole: Podman ends a log stream that does not follow with a broken chunk.
            lines = _last_lines(container.logs(stdout=True, stderr=True), tail)
        except podman.errors.NotFound:
            return ""  # removed between the lookup and the read
        except (podman.errors.APIError, requests.RequestException) as exc:
            raise RuntimeUnavailable(f"Podman could not read the log of {name}: {exc}") from None
        return b"".join(lines).decode("utf-8", "replace")

    def follow_logs(self, name: str, tail: int | None = None) -> Iterator[str]:
        """Yield the container's log (its last `tail` lines, or all) and then new output
        until it stops; a container that is gone ends the stream.

        Podman 4.3's own `tail` drops and merges lines (the first line of a short log goes
        missing), so the tail is cut here: the log is read once to count its lines, then
        followed from the start with all but the last `tail` of those skipped.
        """
        try:
            container = self.client.containers.get(name)
            skip = 0
            if tail is not None:
                counted = _count_lines(container.logs(stdout=True, stderr=True))
                skip = max(counted - tail, 0)
            for chunk in _skip_lines(container.logs(stdout=True, stderr=True, stream=True,
                                                    follow=True), skip):
                yield chunk.decode("utf-8", "replace")
        except podman.errors.NotFound:
            return
        except (podman.errors.APIError, requests.RequestException) as exc:
            raise RuntimeUnavailable(f"Podman could not follow the log of {name}: {exc}",
                                     hint="run 'appliance doctor'") from None

    def stop(self, name: str, timeout: int = 10) -> None:
        try:
            self.client.containers.get(name).stop(timeout=timeout)
        except podman.errors.NotFound:
            pass
        except podman.errors.APIError as exc:
            if _container_gone(exc):
                return
            if "not running" not in _api_error_text(exc) and "stopped" not in str(exc):
                raise RuntimeUnavailable(f"Could not stop {name}: {_api_error_text(exc)}"
                                         ) from None

    def start(self, name: str) -> None:
        try:
            self.client.containers.get(name).start()
        except podman.errors.APIError as exc:
            raise RuntimeUnavailable(f"Could not start {name}: {_api_error_text(exc)}") from None

    def remove_container(self, name: str) -> None:
        try:
            self.client.containers.get(name).remove(force=True)
        except podman.errors.NotFound:
            pass
        except podman.errors.APIError as exc:
            if _container_gone(exc):
                return  # removed by another process meanwhile (a worker retiring it)
            raise RuntimeUnavailable(f"Could not remove {name}: {_api_error_text(exc)}") from None

    def containers(self, space_id: str | None = None) -> list[ContainerState]:
        """List the appliance's containers (optionally one Space's), running or not."""
        label = f"{LABEL_SPACE}={space_id}" if space_id else LABEL_SPACE
        for attempt in range(3):
            try:
                # A list of label filters silently matches nothing on Podman 4.3: pass one
                # string.
                found = self.client.containers.list(all=True, filters={"label": label})
                break
            except (podman.errors.APIError, requests.RequestException) as exc:
                # A container removed while Podman lists them fails the whole listing: ask
                # again, it is gone by then.
                if not _container_gone(exc) or attempt == 2:
                    raise RuntimeUnavailable(
                        f"Podman at {self.url} could not list the containers: "
                        f"{_api_error_text(exc)}", hint="run 'appliance doctor'") from None
        return [
            ContainerState(name=c.name, status=_list_status(c.attrs), exit_code=None,
                           labels=c.labels or {})
            for c in found if self._ours(c.labels or {})
        ]

    def _ours(self, labels: dict[str, str]) -> bool:
        """Tell whether this appliance instance made the object carrying these labels."""
        instance = labels.get(LABEL_INSTANCE)
        if instance is None:  # made before instances were labelled: the default data dir's
            return str(self.config.data_path) == DEFAULT_DATA_DIR
        return instance == self.config.instance_id

    def labelled_images(self) -> dict[str, tuple[str, list[str]]]:
        """Map the id of every image of this instance labelled with a Space to (Space, tags).

        One listing for all Spaces: Podman 4.3 answers a label-filtered listing by inspecting
        every image (about 1.6 s with a hundred Spaces' images here), so callers ask once.
        """
        return {image.id: (image.labels.get(LABEL_SPACE, ""), list(image.tags))
                for image in self._list_images({"label": LABEL_SPACE})
                if self._ours(image.labels or {})}

    def images_of(self, space_id: str) -> dict[str, list[str]]:
        """Map the id of each image labelled with the Space to its tags (maybe none)."""
        found = self._list_images({"label": f"{LABEL_SPACE}={space_id}"})
        return {image.id: list(image.tags) for image in found if self._ours(image.labels or {})}

    def init_pid(self, name: str) -> int | None:
        """Return the host PID of the container's first process; None when it is not running."""
        container = self._find(name)
        return container.attrs.get("State", {}).get("Pid") or None if container else None

    # -- bundles (air-gapped export and import) ----------------------------------------------

    def save_images(self, names: list[str]) -> Iterator[bytes]:
        """Stream one docker-archive holding the named images (shared layers stored once)."""
        try:
            response = self.client.api.get(
                "/images/export", params={"references": list(names), "format": "docker-archive",
                                          "compress": "false"}, stream=True)
            response.raise_for_status()
        except (podman.errors.APIError, requests.RequestException) as exc:
            raise RuntimeUnavailable(f"Podman could not save {', '.join(names)}: "
                                     f"{_api_error_text(exc)}") from None
        return response.iter_content(chunk_size=1 << 20)

    def load_archive(self, archive: Path) -> list[str]:
        """Load a `podman save` archive streamed from disk; return the names Podman reports."""
        try:
            with open(archive, "rb") as body:
                response = self.client.api.post(
                    "/images/load", data=body, headers={"Content-type": "application/x-tar"})
                response.raise_for_status()
        except OSError as exc:
            raise InvalidInput(f"Cannot read image archive {archive}: {exc.strerror}") from None
        except (podman.errors.APIError, requests.RequestException) as exc:
            raise InvalidInput(f"{archive} is not an image archive Podman can load: "
                               f"{_api_error_text(exc)}") from None
        return list(response.json().get("Names") or [])

    def _inspect_image(self, name: str) -> Any:
        try:
            return self.client.images.get(name)
        except podman.errors.ImageNotFound:
            raise InvalidInput(f"Image {name} is not in Podman's storage") from None
        except (podman.errors.APIError, requests.RequestException) as exc:
            raise RuntimeUnavailable(f"Podman at {self.url} failed: {exc}") from None

    def image_id(self, name: str) -> str:
        """Return the full id of the named image."""
        return self._inspect_image(name).id

    def image_labels(self, name: str) -> dict[str, str]:
        return dict(self._inspect_image(name).labels or {})

    def image_ancestors(self, name: str) -> set[str]:
        """Return the ids of the images the named one was built on (from its history)."""
        image = self._inspect_image(name)
        try:
            history = image.history()
        except (podman.errors.APIError, requests.RequestException) as exc:
            raise RuntimeUnavailable(f"Podman could not read the history of {name}: {exc}"
                                     ) from None
        found = {entry.get("Id", "") for entry in history}
        # History names only the steps whose intermediate images still exist; the Parent
        # chain of a locally built image reaches the image it was built FROM.
        parent = image.attrs.get("Parent")
        for _ in range(500):
            if not parent:
                break
            found.add(parent)
            try:
                parent = self.client.images.get(parent).attrs.get("Parent")
            except (podman.errors.APIError, requests.RequestException):
                break
        return {i.removeprefix("sha256:") for i in found if i and i != "<missing>"}

    def fill_volume(self, volume: str, archive: Path, image: str,
                    chown_paths: list[str], owner: str = "1000:1000") -> None:
        """Extract a tar into a volume through a short-lived container of image (no network),
        then give chown_paths (relative to the volume) to the Spaces' user."""
        name = f"appliance-fill-{os.urandom(4).hex()}"
        try:
            container = self.client.containers.create(
                image=image, name=name, command=["sleep", "3600"], user="0:0",
                volumes={volume: {"bind": "/volume", "mode": "rw"}}, network_mode="none",
                labels={LABEL_ROLE: "bundle-import", LABEL_INSTANCE: self.config.instance_id})
            container.start()
            with open(archive, "rb") as body:
                response = self.client.api.put(f"/containers/{name}/archive",
                                               params={"path": "/volume"}, data=body)
            if not response.ok:
                raise RuntimeUnavailable(f"Podman could not write into the volume {volume}: "
                                         f"{_decode_error(response.text)}")
            code, output = container.exec_run(
                ["chown", "-R", owner, *(f"/volume/{p}" for p in chown_paths)])
            if code not in (0, None):
                text = output.decode(errors="replace") if isinstance(output, bytes) else output
                raise RuntimeUnavailable(f"Could not hand the files in {volume} to {owner}: "
                                         f"{text}")
        except (podman.errors.APIError, requests.RequestException) as exc:
            raise RuntimeUnavailable(f"Podman could not fill the volume {volume}: "
                                     f"{_api_error_text(exc)}") from None
        finally:
            self.remove_container(name)


@contextlib.contextmanager
def _flock(path: Path, operation: int) -> Iterator[None]:
    """Hold an flock on path through a descriptor of its own (so threads of one process
    exclude each other too); BlockingIOError where operation has LOCK_NB and it is held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)


class PortInUse(RuntimeUnavailable):
    def __init__(self, port: int):
        super().__init__(f"Port {port} on 127.0.0.1 is already in use by another program",
                         hint="the appliance picks another port; narrow APPLIANCE_PORT_RANGE to "
                         "a range nothing else uses")
        self.port = port


def _list_status(attrs: dict[str, Any]) -> str:
    # List entries carry State as a plain string; podman-py's .status expects a mapping.
    state = attrs.get("State")
    return state if isinstance(state, str) else (state or {}).get("Status", "unknown")


def _decode_error(text: str) -> str:
    try:
        return json.loads(text).get("message", text)
    except ValueError:
        return text


def _context_tar(context: dict[str, bytes | Path], secrets: dict[str, bytes]) -> bytes:
    """Pack build context entries (relative name -> bytes or a directory/file) into a tar."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for arcname, content in context.items():
            if isinstance(content, Path):
                tar.add(content, arcname=arcname, filter=_skip_git)
            else:
                _add_bytes(tar, arcname, content)
        # Podman moves each secret file out of the context before the build sees it.
        for index, key in enumerate(sorted(secrets)):
            _add_bytes(tar, f".appliance-secret-{index}", secrets[key], mode=0o600)
    return buffer.getvalue()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _skip_git(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    parts = Path(info.name).parts
    if ".git" in parts:
        return None
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _last_lines(chunks: Iterator[bytes], tail: int | None) -> list[bytes]:
    """The last `tail` lines (all when None) of a log read as frames, newlines kept."""
    import collections

    kept: collections.deque[bytes] = collections.deque(maxlen=tail or None)
    partial = b""
    for chunk in chunks:
        *whole, partial = (partial + chunk).split(b"\n")
        kept.extend(line + b"\n" for line in whole)
    if partial:
        kept.append(partial)
    return list(kept)


def _count_lines(chunks: Iterator[bytes]) -> int:
    return sum(chunk.count(b"\n") for chunk in chunks)


def _skip_lines(chunks: Iterator[bytes], skip: int) -> Iterator[bytes]:
    """Pass a log's frames on, less its first `skip` lines."""
    for chunk in chunks:
        while skip and chunk:
            end = chunk.find(b"\n")
            if end < 0:
                chunk = b""
                break
            chunk = chunk[end + 1:]
            skip -= 1
        if chunk:
            yield chunk
