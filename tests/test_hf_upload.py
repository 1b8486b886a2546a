"""Writing Spaces with huggingface_hub against the box: create_repo, upload_folder,
create_commit, through the portal served by a real WSGI server on a free port.

The deploy a commit starts is recorded instead of run (jobs.spawn_job is replaced).
"""

from __future__ import annotations

import base64
import json

import pytest
import requests
from conftest import git
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import HfHubHTTPError
from test_git_push import STATIC, Box, run_git, running_box

from appliance import stages
from appliance.core import hosted, sources


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    yield from running_box(tmp_path_factory.mktemp("upload"), "18400-18499", 30,
                           {"ada": "admin", "mia": "member", "max": "member"})


def hf(box: Box, who: str) -> HfApi:
    return HfApi(endpoint=box.url, token=box.tokens[who])


def folder(tmp_path, files: dict[str, str]):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def created(box: Box, space_id: str, who: str = "mia") -> str:
    return hf(box, who).create_repo(space_id, repo_type="space", space_sdk="static").repo_id


def test_create_repo_makes_an_empty_hosted_space(box):
    url = hf(box, "mia").create_repo("mia/empty", repo_type="space", space_sdk="static",
                                     private=True)
    assert url.repo_id == "mia/empty" and url.repo_type == "space"
    row = box.store.get_space("mia/empty")
    assert row["stage"] == stages.NO_APP_FILE and row["sdk"] == "static"
    assert row["source"] == "hosted://mia/empty" and row["visibility"] == "private"
    assert "No commits yet" in row["error"]
    assert (sources.hosted_repo_path(box.config, "mia/empty") / "HEAD").is_file()
    assert hosted.head(box.config, "mia/empty") is None


def test_create_repo_twice_is_a_conflict_unless_exist_ok(box):
    created(box, "mia/twice")
    with pytest.raises(HfHubHTTPError) as caught:
        created(box, "mia/twice")
    assert caught.value.response.status_code == 409
    assert "A Space named mia/twice already exists" in str(caught.value)
    again = hf(box, "mia").create_repo("mia/twice", repo_type="space", space_sdk="static",
                                       exist_ok=True)
    assert again.repo_id == "mia/twice"


def test_create_repo_refuses_models_and_other_users_names(box):
    with pytest.raises(HfHubHTTPError) as caught:
        hf(box, "mia").create_repo("mia/model")
    assert "This box hosts Spaces only, not model repositories" in str(caught.value)
    with pytest.raises(HfHubHTTPError) as caught:
        created(box, "max/notmine")
    assert caught.value.response.status_code == 403
    assert "The owner 'max' of max/notmine is the name of the portal user max" \
        in str(caught.value)
    with pytest.raises(HfHubHTTPError) as caught:
        created(box, "mia/readonly", who="mia-read")
    assert "This token is read-only" in str(caught.value)


def test_upload_folder_commits_as_the_user_and_deploys(box, tmp_path):
    created(box, "mia/uploaded")
    info = hf(box, "mia").upload_folder(folder_path=folder(tmp_path, STATIC),
                                        repo_id="mia/uploaded", repo_type="space",
                                        commit_message="first upload")
    assert info.oid == hosted.head(box.config, "mia/uploaded")
    assert info.commit_url.endswith(f"/spaces/mia/uploaded/commit/{info.oid}")
    assert ("mia/uploaded", "deploy") in box.spawned
    bare = sources.hosted_repo_path(box.config, "mia/uploaded")
    assert sources.hosted_git(bare, "log", "-1", "--format=%an|%s", info.oid).strip() == \
        "mia|first upload"
    assert sources.hosted_git(bare, "ls-tree", "--name-only", info.oid).split() == \
        ["README.md", "index.html"]


def test_an_uploaded_space_clones_and_takes_a_push_on_top(box, tmp_path):
    created(box, "mia/both")
    hf(box, "mia").upload_folder(folder_path=folder(tmp_path / "up", STATIC),
                                 repo_id="mia/both", repo_type="space")
    box.store.move("mia/both", stages.BUILDING, stages.BUILD_ERROR, "test")
    run_git(tmp_path, "clone", box.remote("mia/both", "mia"), "clone")
    clone = tmp_path / "clone"
    (clone / "index.html").write_text("<p>pushed</p>\n")
    git(clone, "commit", "-qam", "pushed")
    done = run_git(clone, "push", "origin", "main")
    assert "remote: Building mia/both" in done.stderr


def test_create_commit_adds_and_deletes_files(box, tmp_path):
    created(box, "mia/ops")
    api = hf(box, "mia")
    api.upload_folder(folder_path=folder(tmp_path, {**STATIC, "old/a.txt": "a",
                                                    "old/b.txt": "b", "gone.txt": "x"}),
                      repo_id="mia/ops", repo_type="space")
    info = api.create_commit("mia/ops", repo_type="space", commit_message="tidy", operations=[
        CommitOperationAdd("new.txt", b"new\n"), CommitOperationDelete("gone.txt"),
        CommitOperationDelete("old/", is_folder=True)])
    bare = sources.hosted_repo_path(box.config, "mia/ops")
    assert sources.hosted_git(bare, "ls-tree", "-r", "--name-only", info.oid).split() == \
        ["README.md", "index.html", "new.txt"]
    with pytest.raises(HfHubHTTPError) as caught:
        api.create_commit("mia/ops", repo_type="space", commit_message="again",
                          operations=[CommitOperationDelete("never.txt")])
    assert "No file 'never.txt' in mia/ops to delete" in str(caught.value)


def test_a_file_over_ten_mib_is_refused_naming_git_push(box):
    created(box, "mia/large")
    with pytest.raises(HfHubHTTPError) as caught:
        hf(box, "mia").upload_file(path_or_fileobj=b"x" * (11 * 1024 * 1024),
                                   path_in_repo="weights.bin", repo_id="mia/large",
                                   repo_type="space")
    assert caught.value.response.status_code == 413
    assert ("weights.bin is 11.0 MiB: this box takes files up to 10 MiB through the Hugging "
            "Face API (it keeps no LFS storage), so mia/large was not changed") \
        in str(caught.value)
    assert "git push" in str(caught.value)
    assert hosted.head(box.config, "mia/large") is None


def test_uploads_need_a_manager_of_a_hosted_space(box, tmp_path):
    created(box, "mia/guarded")
    files = folder(tmp_path, STATIC)
    with pytest.raises(HfHubHTTPError) as caught:
        hf(box, "max").upload_folder(folder_path=files, repo_id="mia/guarded",
                                     repo_type="space")
    assert caught.value.response.status_code == 403
    assert "Only an admin or the member who added mia/guarded may change it" \
        in str(caught.value)
    box.store.insert_space({
        "id": "mia/follows", "source": "https://example.com/mia/follows.git",
        "source_display": "https://example.com/mia/follows.git", "stage": stages.RUNNING,
        "port": 18499, "hardware": "cpu", "desired": "running", "created_by": "token:mia"},
        "test")
    with pytest.raises(HfHubHTTPError) as caught:
        hf(box, "mia").upload_folder(folder_path=files, repo_id="mia/follows",
                                     repo_type="space")
    assert "Space mia/follows follows https://example.com/mia/follows.git; uploading to " \
        "this box is refused" in str(caught.value)
    with pytest.raises(HfHubHTTPError) as caught:
        hf(box, "mia").upload_folder(folder_path=files, repo_id="mia/nowhere",
                                     repo_type="space")
    assert caught.value.response.status_code == 404


def test_only_main_is_kept_and_pull_requests_are_refused(box, tmp_path):
    created(box, "mia/branchy")
    files = folder(tmp_path, STATIC)
    with pytest.raises(HfHubHTTPError) as caught:
        hf(box, "mia").upload_folder(folder_path=files, repo_id="mia/branchy",
                                     repo_type="space", revision="dev")
    assert "This box keeps only the branch main of mia/branchy, not 'dev'" in str(caught.value)
    response = requests.post(f"{box.url}/api/spaces/mia/branchy/commit/main",
                             params={"create_pr": "1"}, data=b"",
                             headers={"Authorization": f"Bearer {box.tokens['mia']}"},
                             timeout=30)
    assert response.status_code == 400
    assert response.json()["error"] == "Pull requests are not kept on this box"


def test_a_readme_this_box_cannot_read_is_refused_before_the_commit(box, tmp_path):
    created(box, "mia/badcard")
    files = folder(tmp_path, {"README.md": "---\nsdk: cobol\n---\n", "index.html": "x"})
    with pytest.raises(ValueError) as caught:
        hf(box, "mia").upload_folder(folder_path=files, repo_id="mia/badcard",
                                     repo_type="space")
    assert "Invalid metadata in README.md" in str(caught.value)
    assert "cobol" in str(caught.value)
    assert hosted.head(box.config, "mia/badcard") is None


@pytest.mark.parametrize("path", ["../escape.txt", ".git/config", "a/../../b", "/abs.txt",
                                  "a\x00b", "dir\\file", "x" * 2000, 42])
def test_hostile_paths_in_a_commit_are_refused(box, path):
    space_id = "mia/hostile"
    if box.store.find_space(space_id) is None:
        created(box, space_id)
    body = b"".join(json.dumps(line).encode() + b"\n" for line in [
        {"key": "header", "value": {"summary": "evil"}},
        {"key": "file", "value": {"path": path, "encoding": "base64",
                                  "content": base64.b64encode(b"pwned").decode()}}])
    response = requests.post(f"{box.url}/api/spaces/{space_id}/commit/main", data=body,
                             headers={"Authorization": f"Bearer {box.tokens['mia']}",
                                      "Content-Type": "application/x-ndjson"}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith("Invalid file path")
    assert hosted.head(box.config, space_id) is None


def test_a_commit_on_a_stale_parent_is_refused(box, tmp_path):
    created(box, "mia/stale")
    api = hf(box, "mia")
    first = api.upload_folder(folder_path=folder(tmp_path, STATIC), repo_id="mia/stale",
                              repo_type="space")
    api.create_commit("mia/stale", repo_type="space", commit_message="second",
                      operations=[CommitOperationAdd("b.txt", b"b")])
    with pytest.raises(HfHubHTTPError) as caught:
        api.create_commit("mia/stale", repo_type="space", commit_message="late",
                          parent_commit=first.oid,
                          operations=[CommitOperationAdd("c.txt", b"c")])
    assert caught.value.response.status_code == 409
    assert f"not {first.oid[:12]}" in str(caught.value)
