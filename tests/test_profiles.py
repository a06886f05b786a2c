import pytest
import torch

from contrastive.profiles import PROFILES, banner, get_profile


def test_profile_is_chosen_by_the_hardware(monkeypatch):
    monkeypatch.delenv("CONTRASTIVE_PROFILE", raising=False)
    expected = "gpu" if torch.cuda.is_available() else "cpu"
    assert get_profile().name == expected


def test_environment_variable_overrides_and_argument_overrides_both(monkeypatch):
    monkeypatch.setenv("CONTRASTIVE_PROFILE", "smoke")
    assert get_profile().name == "smoke"
    assert get_profile("cpu").name == "cpu"


def test_unknown_profile_is_an_error_listing_the_valid_ones(monkeypatch):
    monkeypatch.setenv("CONTRASTIVE_PROFILE", "laptop")
    with pytest.raises(ValueError, match="smoke, cpu, gpu"):
        get_profile()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown without CUDA")
def test_gpu_profile_without_cuda_says_so():
    with pytest.raises(ValueError, match="CUDA"):
        get_profile("gpu")


def test_overrides_replace_fields_and_unknown_fields_are_refused():
    assert get_profile("smoke", epochs=7).epochs == 7
    with pytest.raises(ValueError, match="unknown profile fields"):
        get_profile("smoke", epoch=7)


def test_profiles_match_the_design():
    assert PROFILES["smoke"].backbone == "convnet_tiny"
    assert PROFILES["cpu"].backbone == "convnet_small" and PROFILES["cpu"].device == "cpu"
    gpu = PROFILES["gpu"]
    assert (gpu.backbone, gpu.batch_size, gpu.amp, gpu.train_size) == ("resnet18", 512, True, None)


def test_banner_names_profile_device_and_data():
    line = banner(get_profile("smoke"), "synthetic")
    assert "profile=smoke" in line and "cpu" in line and "data: synthetic" in line
