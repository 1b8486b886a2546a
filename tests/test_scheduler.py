"""The scheduler's wiring: every step is scheduled, at its configured interval, once."""

from __future__ import annotations

from appliance.config import load_config
from appliance.upkeep import scheduler


def test_every_step_is_scheduled_at_its_configured_interval(tmp_path):
    config = load_config({}, data_dir=str(tmp_path), reconcile_interval=7, health_interval=11,
                         wake_interval=2)
    jobs = {job.id: job for job in scheduler.build_scheduler(config).get_jobs()}
    assert set(jobs) == set(scheduler.STEPS)
    assert jobs["reconcile"].trigger.interval.total_seconds() == 7
    assert jobs["health"].trigger.interval.total_seconds() == 11
    assert jobs["sleep"].trigger.interval.total_seconds() == 2


def test_a_failing_step_is_logged_and_does_not_raise(tmp_path, caplog, monkeypatch):
    from appliance.errors import RuntimeUnavailable

    def broken(ctx):
        raise RuntimeUnavailable("Cannot reach Podman at unix:///nowhere")

    monkeypatch.setitem(scheduler.STEPS, "reconcile", broken)
    scheduler.run_step(load_config({}, data_dir=str(tmp_path)), "reconcile")
    assert "reconcile failed: Cannot reach Podman at unix:///nowhere" in caplog.text
