"""GPU admission and placement: the rules, every refusal a user reads, and no overbooking."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import InvalidInput
from appliance.gpu.allocation import (
    Allocation,
    Decision,
    HardwareRequest,
    admit,
    parse_hardware,
    reconcile_allocations,
    suggested_budget_mib,
)
from appliance.gpu.nvml import Gpu, Inventory, MigDevice


def gpu(index: int, memory: int | None = 40960, name: str = "NVIDIA A100-SXM4-40GB",
        migs: tuple[MigDevice, ...] | None = None, jetson: bool = False,
        uuid: str | None = None) -> Gpu:
    return Gpu(
        index=index, uuid=f"GPU-{index}" if uuid is None else uuid, name=name,
        memory_total_mib=memory, memory_used_mib=0, memory_free_mib=memory,
        utilization_gpu=0, utilization_memory=0, temperature_c=40, power_w=50.0,
        mig_enabled=migs is not None, mig_devices=migs or (), processes=(), jetson=jetson,
    )


def mig(gpu_index: int, index: int, memory: int) -> MigDevice:
    return MigDevice(index, f"MIG-{gpu_index}-{index}", memory)


def box(*gpus: Gpu) -> Inventory:
    return Inventory(available=True, driver_version="550.54", cuda_version="12.4", gpus=gpus)


def whole(space: str, *uuids: str) -> Allocation:
    return Allocation(space, "gpu", uuids, None, None)


def shared(space: str, uuid: str, mib: int) -> Allocation:
    return Allocation(space, "shared", (uuid,), None, mib)


def mig_of(space: str, uuid: str, mig_uuid: str) -> Allocation:
    return Allocation(space, "mig", (uuid,), mig_uuid, None)


# A100-80GB in MIG mode: 1g.10gb devices are 9728 MiB, 2g.20gb 19968 MiB, 3g.40gb 40192 MiB.
A100_MIGS = (mig(0, 0, 9728), mig(0, 1, 9728), mig(0, 2, 19968), mig(0, 3, 40192))
ORIN = gpu(0, memory=62827, name="Jetson AGX Orin", jetson=True, uuid="")
NO_DRIVER = Inventory(available=False, reason="no NVIDIA driver (libnvidia-ml.so.1 not found)")


# -- parse_hardware --------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("cpu", HardwareRequest("cpu")),
    ("gpu", HardwareRequest("gpu", count=1)),
    ("gpu:2", HardwareRequest("gpu", count=2)),
    (" GPU:1 ", HardwareRequest("gpu", count=1)),
    ("mig:1g.10gb", HardwareRequest("mig", mig_profile="1g.10gb")),
    ("mig:1g.10gb+me", HardwareRequest("mig", mig_profile="1g.10gb+me")),
    ("mig:1g.10gb+me.all", HardwareRequest("mig", mig_profile="1g.10gb+me.all")),
    ("mig:1g.10gb-me", HardwareRequest("mig", mig_profile="1g.10gb-me")),
    ("mig:2g.24gb+gfx", HardwareRequest("mig", mig_profile="2g.24gb+gfx")),
    ("shared:8192", HardwareRequest("shared", memory_mib=8192)),
    ("shared:8g", HardwareRequest("shared", memory_mib=8192)),
    ("shared:8GiB", HardwareRequest("shared", memory_mib=8192)),
    ("shared:512mb", HardwareRequest("shared", memory_mib=512)),
])
def test_parse_hardware_reads_every_documented_form(text, expected):
    assert parse_hardware(text) == expected


@pytest.mark.parametrize("text", ["cpu", "gpu", "gpu:3", "mig:3g.40gb", "shared:8192"])
def test_a_parsed_request_prints_back_as_its_canonical_form(text):
    assert str(parse_hardware(text)) == text


@pytest.mark.parametrize("text", ["tpu", "", "gpu:", "gpu:two", "shared", "shared:-5",
                                  "shared:8t", "gpus:2", "mig", "cuda"])
def test_parse_hardware_refuses_unknown_text_and_lists_the_forms(text):
    with pytest.raises(InvalidInput) as caught:
        parse_hardware(text)
    assert f"Hardware {text!r} is not a hardware request" in caught.value.message
    assert "cpu, gpu, gpu:N" in caught.value.hint
    assert "mig:PROFILE" in caught.value.hint and "shared:8g" in caught.value.hint


@pytest.mark.parametrize("text", ["gpu:0", "gpu:65", "gpu:100000"])
def test_parse_hardware_refuses_zero_or_absurd_gpu_counts(text):
    with pytest.raises(InvalidInput) as caught:
        parse_hardware(text)
    assert "a request takes 1 to 64" in caught.value.message


@pytest.mark.parametrize(("text", "mib"), [
    ("shared:0", 0), ("shared:8", 8), ("shared:2048g", 2097152), ("shared:99999999", 99999999),
])
def test_parse_hardware_refuses_tiny_or_absurd_budgets(text, mib):
    with pytest.raises(InvalidInput) as caught:
        parse_hardware(text)
    assert caught.value.message == (
        f"Hardware {text!r} is a budget of {mib} MiB; a shared budget is 256 MiB to 1024 GiB")
    assert "shared:8g" in caught.value.hint


@pytest.mark.parametrize("text", ["mig:10gb", "mig:9g.10gb", "mig:1c.2g.20gb", "mig:"])
def test_parse_hardware_refuses_a_malformed_mig_profile(text):
    with pytest.raises(InvalidInput) as caught:
        parse_hardware(text)
    assert caught.value.message == (
        f"Hardware {text!r} names no MIG profile: expected SLICESg.MEMORYgb")
    assert "mig:1g.10gb" in caught.value.hint


def test_parse_hardware_answers_a_hugging_face_flavor_with_a_suggestion_not_a_request():
    with pytest.raises(InvalidInput) as caught:
        parse_hardware("t4-small")
    assert caught.value.message == (
        "Hardware 't4-small' is a Hugging Face flavor, not a request this box understands")
    assert caught.value.hint.startswith("use shared:16g (its GPU memory) or gpu;")
    with pytest.raises(InvalidInput) as caught:
        parse_hardware("a10g-largex2")
    assert caught.value.hint.startswith(
        "use gpu:2 (its 2 GPUs), or shared:24g at most for one GPU's share;")
    with pytest.raises(InvalidInput) as caught:
        parse_hardware("cpu-basic")
    assert caught.value.hint == "use cpu"


@pytest.mark.parametrize("flavor", ["h100x8", "h200x8", "a100x8", "l40sx8", "l4x4"])
def test_a_multi_gpu_flavor_hint_suggests_no_budget_larger_than_one_gpu(flavor):
    with pytest.raises(InvalidInput) as caught:
        parse_hardware(flavor)
    hint = caught.value.hint
    per_gpu, count = {"h100x8": (80, 8), "h200x8": (141, 8), "a100x8": (80, 8),
                      "l40sx8": (48, 8), "l4x4": (24, 4)}[flavor]
    assert hint.startswith(f"use gpu:{count} (its {count} GPUs), or shared:{per_gpu}g at most")
    suggested = [int(size) for size in re.findall(r"shared:(\d+)g", hint)]
    assert suggested and max(suggested) <= per_gpu


# -- suggested_budget_mib --------------------------------------------------------------------


@pytest.mark.parametrize(("flavor", "mib"), [
    ("t4-small", 16384), ("t4-medium", 16384), ("l4x1", 24576), ("l4x4", 4 * 24576),
    ("a10g-small", 24576), ("a10g-large", 24576), ("a10g-largex2", 2 * 24576),
    ("a10g-largex4", 4 * 24576), ("a100-large", 81920), ("h100", 81920), ("l40sx1", 49152),
    ("zero-a10g", 24576), ("T4-Small", 16384),
])
def test_suggested_budget_is_the_flavors_gpu_memory(flavor, mib):
    assert suggested_budget_mib(flavor) == mib


@pytest.mark.parametrize("flavor", ["cpu-basic", "cpu-upgrade", "inf2x6", "v9-quantum", "", None])
def test_cpu_and_unknown_flavors_suggest_no_budget(flavor):
    assert suggested_budget_mib(flavor) is None


# -- cpu and boxes without a GPU -------------------------------------------------------------


def test_cpu_is_always_admitted_without_an_allocation():
    for inventory in (NO_DRIVER, box(), box(gpu(0))):
        assert admit(HardwareRequest("cpu"), "team/a", inventory, [whole("x", "GPU-0")]) == \
            Decision(True, None, None)


@pytest.mark.parametrize("text", ["gpu", "gpu:2", "mig:1g.10gb", "shared:8g"])
def test_a_box_without_a_driver_refuses_every_gpu_request_and_says_why(text):
    decision = admit(parse_hardware(text), "team/a", NO_DRIVER, [])
    assert decision == Decision(False, None, "This box has no NVIDIA GPU "
                                             "(no NVIDIA driver (libnvidia-ml.so.1 not found))")


def test_a_box_where_nvml_finds_no_gpu_refuses_gpu_requests():
    decision = admit(parse_hardware("gpu"), "team/a", box(), [])
    assert decision.reason == "This box has no NVIDIA GPU (NVML found none)"


# -- whole GPUs ------------------------------------------------------------------------------


def test_whole_gpu_takes_the_lowest_index_free_gpu():
    inventory = box(gpu(0), gpu(1), gpu(2))
    decision = admit(parse_hardware("gpu"), "team/c", inventory, [whole("team/a", "GPU-0")])
    assert decision == Decision(True, Allocation("team/c", "gpu", ("GPU-1",), None, None), None)


def test_gpu_n_takes_the_n_lowest_index_free_gpus():
    inventory = box(gpu(0), gpu(1), gpu(2), gpu(3))
    decision = admit(parse_hardware("gpu:2"), "team/c", inventory,
                     [shared("team/a", "GPU-1", 4096)])
    assert decision.allocation == Allocation("team/c", "gpu", ("GPU-0", "GPU-2"), None, None)


def test_a_gpu_with_a_shared_budget_is_never_taken_whole():
    inventory = box(gpu(0, name="NVIDIA A100"), gpu(1, name="NVIDIA A100"))
    existing = [whole("team/a", "GPU-0"), shared("team/b", "GPU-1", 8192)]
    decision = admit(parse_hardware("gpu"), "team/c", inventory, existing)
    assert decision == Decision(False, None, (
        "No whole GPU is free: GPU 0 (A100) is given to team/a; "
        "GPU 1 (A100) has shared budgets of 8192 MiB (team/b)"))


def test_gpu_n_refusal_counts_the_free_gpus_and_lists_what_holds_the_rest():
    inventory = box(gpu(0, name="NVIDIA L4"), gpu(1, name="NVIDIA L4"),
                    gpu(2, name="NVIDIA L4", migs=()))
    existing = [shared("team/b", "GPU-1", 4096), shared("team/a", "GPU-1", 2048)]
    decision = admit(parse_hardware("gpu:2"), "team/c", inventory, existing)
    assert decision.reason == (
        "gpu:2 needs 2 whole GPUs and 1 is free: GPU 0 (L4) is free; "
        "GPU 1 (L4) has shared budgets of 2048 MiB (team/a), 4096 MiB (team/b); "
        "GPU 2 (L4) is in MIG mode (only its MIG devices are handed out)")


def test_a_refusal_sums_the_budgets_of_a_gpu_with_many_sharers():
    existing = [shared(f"team/s{n}", "GPU-0", 1024 * n) for n in range(1, 6)]
    decision = admit(parse_hardware("gpu"), "team/z", box(gpu(0, name="NVIDIA L4")), existing)
    assert decision.reason == (
        "No whole GPU is free: GPU 0 (L4) has 5 shared budgets, 15360 MiB in all "
        "(team/s1, team/s2, team/s3 and 2 more)")


def test_a_gpu_in_mig_mode_is_never_taken_whole():
    inventory = box(gpu(0, migs=A100_MIGS))
    decision = admit(parse_hardware("gpu"), "team/a", inventory, [])
    assert not decision.admitted
    assert "GPU 0 (A100-SXM4-40GB) is in MIG mode" in decision.reason


def test_a_gpu_whose_uuid_could_not_be_read_is_not_handed_out():
    decision = admit(parse_hardware("gpu"), "team/a", box(gpu(0, uuid="")), [])
    assert decision.reason == "No whole GPU is free: GPU 0 (A100-SXM4-40GB) has no readable UUID"


# -- shared budgets --------------------------------------------------------------------------


def test_shared_budget_goes_to_the_gpu_with_the_least_room_that_still_fits():
    inventory = box(gpu(0, memory=81920), gpu(1, memory=24576), gpu(2, memory=40960))
    # Rooms after the 2048 MiB reserve: GPU 0 79872, GPU 1 22528, GPU 2 38912 - 30000 = 8912.
    existing = [shared("team/a", "GPU-2", 30000)]
    assert admit(parse_hardware("shared:8g"), "team/b", inventory, existing).allocation == \
        Allocation("team/b", "shared", ("GPU-2",), None, 8192)
    assert admit(parse_hardware("shared:9000"), "team/b", inventory, existing).allocation == \
        Allocation("team/b", "shared", ("GPU-1",), None, 9000)
    assert admit(parse_hardware("shared:30g"), "team/b", inventory, existing).allocation == \
        Allocation("team/b", "shared", ("GPU-0",), None, 30720)


def test_shared_budget_ties_go_to_the_lowest_index():
    inventory = box(gpu(2), gpu(0), gpu(1))
    decision = admit(parse_hardware("shared:4g"), "team/a", inventory, [])
    assert decision.allocation.gpu_uuids == ("GPU-0",)


def test_shared_budgets_fill_a_gpu_up_to_its_memory_less_the_reserve_and_no_further():
    inventory = box(gpu(0, memory=40960))
    existing = [shared("team/a", "GPU-0", 20000)]
    assert admit(HardwareRequest("shared", memory_mib=18912), "team/b", inventory,
                 existing).admitted
    decision = admit(HardwareRequest("shared", memory_mib=18913), "team/b", inventory, existing)
    assert decision.reason == (
        "Shared budget 18913 MiB does not fit: "
        "GPU 0 (A100-SXM4-40GB) has 18912 MiB left of 40960 MiB (reserve 2048)")


def test_shared_refusal_says_what_is_left_on_each_gpu_and_what_holds_the_others():
    inventory = box(gpu(0, name="NVIDIA A100"), gpu(1, name="NVIDIA A100"),
                    gpu(2, name="NVIDIA A100", migs=A100_MIGS), gpu(3, memory=None, name=""))
    existing = [shared("team/b", "GPU-0", 24576), whole("team/a", "GPU-1")]
    decision = admit(HardwareRequest("shared", memory_mib=20000), "team/c", inventory, existing,
                     reserve_mib=2048)
    assert decision == Decision(False, None, (
        "Shared budget 20000 MiB does not fit: "
        "GPU 0 (A100) has 14336 MiB left of 40960 MiB (reserve 2048); "
        "GPU 1 (A100) is given to team/a; "
        "GPU 2 (A100) is in MIG mode (ask for mig:PROFILE); "
        "GPU 3 reports no memory size"))


def test_a_whole_gpu_gets_no_shared_budget():
    decision = admit(parse_hardware("shared:1g"), "team/b", box(gpu(0)), [whole("team/a", "GPU-0")])
    assert decision.reason == (
        "Shared budget 1024 MiB does not fit: GPU 0 (A100-SXM4-40GB) is given to team/a")


def test_the_reserve_is_a_parameter():
    inventory = box(gpu(0, memory=16384))
    request = parse_hardware("shared:15g")
    assert not admit(request, "team/a", inventory, []).admitted
    assert admit(request, "team/a", inventory, [], reserve_mib=1024).admitted


# -- MIG -------------------------------------------------------------------------------------


def test_mig_request_takes_the_first_free_device_of_that_size():
    inventory = box(gpu(0, migs=A100_MIGS))
    existing = [mig_of("team/a", "GPU-0", "MIG-0-0")]
    decision = admit(parse_hardware("mig:1g.10gb"), "team/b", inventory, existing)
    assert decision == Decision(
        True, Allocation("team/b", "mig", ("GPU-0",), "MIG-0-1", None), None)
    decision = admit(parse_hardware("mig:3g.40gb"), "team/b", inventory, existing)
    assert decision.allocation.mig_uuid == "MIG-0-3"


def test_mig_profile_matches_the_real_sizes_of_known_cards():
    # Sizes as nvidia-smi reports them: A100-40GB 1g.5gb, A30 1g.6gb, H100 NVL 1g.12gb.
    inventory = box(gpu(0, migs=(mig(0, 0, 4864), mig(0, 1, 5952), mig(0, 2, 11008))))
    for profile, expected in (("1g.5gb", "MIG-0-0"), ("1g.6gb", "MIG-0-1"),
                              ("1g.12gb", "MIG-0-2")):
        decision = admit(parse_hardware(f"mig:{profile}"), "team/a", inventory, [])
        assert decision.allocation.mig_uuid == expected, profile
    assert not admit(parse_hardware("mig:1g.10gb"), "team/a", inventory, []).admitted


def test_a_mig_device_is_given_to_one_space_only():
    inventory = box(gpu(0, name="NVIDIA A100", migs=A100_MIGS))
    existing = [mig_of("team/a", "GPU-0", "MIG-0-0"), mig_of("team/b", "GPU-0", "MIG-0-1")]
    decision = admit(parse_hardware("mig:1g.10gb"), "team/c", inventory, existing)
    assert decision == Decision(False, None, (
        "No 1g.10gb MIG device is free: GPU 0 (A100) MIG 0 is given to team/a; "
        "GPU 0 (A100) MIG 1 is given to team/b; free MIG devices of other profiles: "
        "GPU 0 (A100) MIG 2 (19968 MiB, profile unknown), "
        "GPU 0 (A100) MIG 3 (40192 MiB, profile unknown)"))


def test_a_mig_profile_no_device_matches_is_refused_with_the_sizes_there_are():
    inventory = box(gpu(0, name="NVIDIA A100", migs=A100_MIGS))
    decision = admit(parse_hardware("mig:7g.80gb"), "team/a", inventory, [])
    assert decision.reason == (
        "No MIG device matches 7g.80gb (about 81920 MiB) on this box; free MIG devices of "
        "other profiles: GPU 0 (A100) MIG 0 (9728 MiB, profile unknown), "
        "GPU 0 (A100) MIG 1 (9728 MiB, profile unknown), "
        "GPU 0 (A100) MIG 2 (19968 MiB, profile unknown), "
        "GPU 0 (A100) MIG 3 (40192 MiB, profile unknown)")


# H100 80GB: 1g.20gb and 2g.20gb hold the same memory; MIG 3 is one compute instance of two
# in a 3g.40gb GPU instance.
H100_MIGS = (MigDevice(0, "MIG-0-0", 19968, profile="1g.20gb"),
             MigDevice(1, "MIG-0-1", 19968, profile="2g.20gb"),
             MigDevice(2, "MIG-0-2", 9728, profile="1g.10gb+me"),
             MigDevice(3, "MIG-0-3", 40192, profile="1c.3g.40gb"))


def test_mig_devices_of_equal_memory_are_placed_by_their_profile():
    inventory = box(gpu(0, memory=81559, name="NVIDIA H100 80GB HBM3", migs=H100_MIGS))
    for profile, expected in (("2g.20gb", "MIG-0-1"), ("1g.20gb", "MIG-0-0"),
                              ("1g.10gb+me", "MIG-0-2")):
        decision = admit(parse_hardware(f"mig:{profile}"), "team/a", inventory, [])
        assert decision.allocation.mig_uuid == expected, profile
    taken = [mig_of("team/a", "GPU-0", "MIG-0-1")]
    decision = admit(parse_hardware("mig:2g.20gb"), "team/b", inventory, taken)
    assert decision.reason == (
        "No 2g.20gb MIG device is free: GPU 0 (H100 80GB HBM3) MIG 1 is given to team/a; "
        "free MIG devices of other profiles: GPU 0 (H100 80GB HBM3) MIG 0 (1g.20gb), "
        "GPU 0 (H100 80GB HBM3) MIG 2 (1g.10gb+me), GPU 0 (H100 80GB HBM3) MIG 3 (1c.3g.40gb)")


def test_a_named_mig_device_is_not_matched_by_memory_nor_a_compute_share_as_its_instance():
    inventory = box(gpu(0, memory=81559, name="NVIDIA H100", migs=H100_MIGS))
    # 1g.10gb+me has the memory of a 1g.10gb; 1c.3g.40gb is a third of a 3g.40gb.
    for profile in ("1g.10gb", "3g.40gb"):
        decision = admit(parse_hardware(f"mig:{profile}"), "team/a", inventory, [])
        assert not decision.admitted, profile
        assert decision.reason.startswith(f"No MIG device matches {profile} (about ")


def test_mig_on_a_box_without_mig_mode_says_how_to_enable_it():
    decision = admit(parse_hardware("mig:1g.10gb"), "team/a", box(gpu(0, name="NVIDIA L4")), [])
    assert decision.reason == (
        "No GPU on this box is in MIG mode, so mig:1g.10gb cannot be given: GPU 0 (L4) is free. "
        "Enable MIG and create instances (nvidia-smi -mig 1; nvidia-smi mig -cgi ...), "
        "or ask for gpu or shared:SIZE")


def test_a_gpu_in_mig_mode_takes_no_shared_budget():
    decision = admit(parse_hardware("shared:1g"), "team/a", box(gpu(0, migs=A100_MIGS)), [])
    assert decision.reason == ("Shared budget 1024 MiB does not fit: "
                               "GPU 0 (A100-SXM4-40GB) is in MIG mode (ask for mig:PROFILE)")


# -- Jetson ----------------------------------------------------------------------------------


def test_a_jetson_takes_shared_budgets_against_system_memory():
    decision = admit(parse_hardware("shared:8g"), "team/a", box(ORIN), [])
    assert decision == Decision(
        True, Allocation("team/a", "shared", ("index:0",), None, 8192), None)
    existing = [shared("team/b", "index:0", 50000)]
    decision = admit(parse_hardware("shared:16g"), "team/a", box(ORIN), existing)
    assert decision.reason == ("Shared budget 16384 MiB does not fit: GPU 0 (Jetson AGX Orin) "
                               "has 10779 MiB left of 62827 system memory (reserve 2048)")


@pytest.mark.parametrize(("text", "what"), [("gpu", "whole GPU"), ("gpu:2", "whole GPU"),
                                            ("mig:1g.10gb", "MIG devices")])
def test_a_jetson_refuses_whole_and_mig_requests_and_points_at_shared(text, what):
    decision = admit(parse_hardware(text), "team/a", box(ORIN), [])
    assert decision == Decision(False, None, (
        "GPU 0 (Jetson AGX Orin) is a Jetson's integrated GPU: it shares the system memory, "
        f"so it has no {what} to give; ask for shared:SIZE (e.g. shared:8g) instead"))


# -- re-admission and determinism ------------------------------------------------------------


def test_a_space_is_readmitted_against_the_others_ignoring_its_own_allocation():
    inventory = box(gpu(0))
    mine = whole("team/a", "GPU-0")
    assert admit(parse_hardware("gpu"), "team/a", inventory, [mine]).allocation == mine
    budget = shared("team/a", "GPU-0", 38912)
    assert admit(parse_hardware("shared:38912"), "team/a", inventory, [budget]).allocation == \
        budget
    assert not admit(parse_hardware("shared:1g"), "team/b", inventory, [budget]).admitted


def test_the_same_inputs_give_the_same_decision_whatever_the_order_of_allocations():
    inventory = box(gpu(0, name="NVIDIA A100"), gpu(1, name="NVIDIA A100", migs=A100_MIGS),
                    gpu(2, name="NVIDIA A100"), gpu(3, name="NVIDIA A100"))
    existing = [shared("team/a", "GPU-0", 8192), shared("team/b", "GPU-0", 4096),
                mig_of("team/c", "GPU-1", "MIG-0-0"), whole("team/d", "GPU-2"),
                shared("team/e", "GPU-3", 30000)]
    shuffler = random.Random(7)
    for text in ("gpu", "shared:4g", "shared:20g", "shared:40g", "mig:1g.10gb", "mig:7g.80gb"):
        first = admit(parse_hardware(text), "team/z", inventory, existing)
        for _ in range(20):
            order = existing[:]
            shuffler.shuffle(order)
            assert admit(parse_hardware(text), "team/z", inventory, order) == first, text


def test_admit_refuses_a_malformed_request_object():
    with pytest.raises(InvalidInput, match="Hardware kind 'tpu' is unknown"):
        admit(HardwareRequest("tpu"), "team/a", box(gpu(0)), [])
    with pytest.raises(InvalidInput, match="A request for 0 whole GPUs cannot be met"):
        admit(HardwareRequest("gpu", count=0), "team/a", box(gpu(0)), [])
    with pytest.raises(InvalidInput, match="A shared budget of None MiB cannot be met"):
        admit(HardwareRequest("shared"), "team/a", box(gpu(0)), [])
    with pytest.raises(InvalidInput, match="MIG profile '' is not SLICESg.MEMORYgb"):
        admit(HardwareRequest("mig"), "team/a", box(gpu(0)), [])


# -- reconcile_allocations -------------------------------------------------------------------


def test_reconcile_drops_allocations_whose_gpu_or_mig_device_is_gone():
    inventory = box(gpu(0), gpu(1, migs=(mig(1, 0, 9728),)))
    existing = [
        whole("team/a", "GPU-0"),
        whole("team/b", "GPU-0", "GPU-7"),
        shared("team/c", "GPU-9", 8192),
        mig_of("team/d", "GPU-1", "MIG-1-0"),
        mig_of("team/e", "GPU-1", "MIG-1-5"),
    ]
    kept, messages = reconcile_allocations(existing, inventory)
    assert kept == [existing[0], existing[3]]
    assert messages == [
        "Dropped the 2 whole GPUs of team/b: GPU GPU-7 is no longer on this box",
        "Dropped the shared budget of 8192 MiB of team/c: GPU GPU-9 is no longer on this box",
        "Dropped the MIG device of team/e: MIG device MIG-1-5 is no longer on this box",
    ]


def test_reconcile_keeps_everything_while_the_inventory_cannot_be_read():
    existing = [whole("team/a", "GPU-0")]
    assert reconcile_allocations(existing, NO_DRIVER) == (existing, [])


def test_reconcile_keeps_a_jetsons_budget():
    existing = [shared("team/a", "index:0", 4096)]
    assert reconcile_allocations(existing, box(ORIN)) == (existing, [])


# -- no overbooking, whatever happens --------------------------------------------------------

RESERVE = 2048


@st.composite
def inventories(draw) -> Inventory:
    if draw(st.booleans()) and draw(st.booleans()):
        return box(gpu(0, memory=draw(st.integers(4096, 65536)), jetson=True, uuid=""))
    gpus = []
    for index in range(draw(st.integers(1, 4))):
        memory = draw(st.sampled_from([16384, 24576, 40960, 81920]))
        migs = None
        if draw(st.integers(0, 3)) == 0:
            sizes = draw(st.lists(st.sampled_from([9728, 19968, 40192]), max_size=5))
            migs = tuple(mig(index, slot, size) for slot, size in enumerate(sizes))
        gpus.append(gpu(index, memory=memory, migs=migs))
    return box(*gpus)


requests = st.one_of(
    st.just(HardwareRequest("cpu")),
    st.builds(HardwareRequest, st.just("gpu"), count=st.integers(1, 3)),
    st.builds(HardwareRequest, st.just("mig"),
              mig_profile=st.sampled_from(["1g.10gb", "2g.20gb", "3g.40gb", "7g.80gb"])),
    st.builds(HardwareRequest, st.just("shared"), memory_mib=st.one_of(
        st.integers(256, 40000),
        # halves and wholes of what the cards hold after the reserve: budgets that fill a GPU
        st.sampled_from([7168, 11264, 14336, 19456, 22528, 38912]),
    )),
)


def assert_not_overbooked(inventory: Inventory, allocations: list[Allocation]) -> None:
    for card in inventory.gpus:
        key = card.uuid or f"index:{card.index}"
        on_card = [a for a in allocations if key in a.gpu_uuids]
        budgets = sum(a.memory_mib for a in on_card if a.kind == "shared")
        assert budgets <= card.memory_total_mib - RESERVE
        whole_holders = [a for a in on_card if a.kind == "gpu"]
        assert len(whole_holders) <= 1
        if whole_holders:
            assert on_card == whole_holders, "a whole GPU is shared with another allocation"
        if card.mig_enabled:
            assert all(a.kind == "mig" for a in on_card)
        if card.jetson:
            assert all(a.kind == "shared" for a in on_card)
    mig_uuids = [a.mig_uuid for a in allocations if a.kind == "mig"]
    assert len(mig_uuids) == len(set(mig_uuids))
    assert len({a.space_id for a in allocations}) == len(allocations)


@settings(max_examples=300, deadline=None)
@given(inventory=inventories(),
       steps=st.lists(st.tuples(st.integers(0, 7), requests), max_size=40))
def test_admitted_allocations_never_overbook_a_gpu(inventory, steps):
    allocations: list[Allocation] = []
    for space_number, request in steps:
        space = f"team/s{space_number}"
        decision = admit(request, space, inventory, allocations, reserve_mib=RESERVE)
        assert decision == admit(request, space, inventory, allocations[::-1],
                                 reserve_mib=RESERVE)
        if decision.admitted:
            # The caller replaces the Space's old allocation with the new one.
            allocations = [a for a in allocations if a.space_id != space]
            if decision.allocation is not None:
                assert decision.allocation.space_id == space
                allocations.append(decision.allocation)
        else:
            assert decision.allocation is None and decision.reason
        assert_not_overbooked(inventory, allocations)
