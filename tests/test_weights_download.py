"""Annotator weight downloads against a local stand-in for the Hugging Face hub (tests/servers/hub.py): an
interrupted download resumes, a wrong hash is rejected, a stalled server times out with one sentence. Nothing
here reaches the network: every URL is 127.0.0.1."""
import hashlib
import urllib.request

import numpy as np
import pytest
from annotator_settings import annotator_folder
from servers import serve

from annotators import download, random_weights, weights
from annotators.weights import AnnotatorWeightsError
from lib_controlnet import preprocess
from lib_controlnet.settings import Settings

IMAGE = (np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    served = tmp_path_factory.mktemp("hub")
    random_weights.write(served, ["sk_model.pth", "sk_model2.pth"])
    import torch

    torch.save({"x": torch.zeros(75_000)}, served / "depth_anything_vitl14.pth")
    with serve("hub.py", "--files", str(served), "--stall-seconds", "5") as url:
        yield url, served


@pytest.fixture()
def online(tmp_path, monkeypatch):
    """Downloads allowed, HF_HUB_OFFLINE lifted (the suite sets it), a fresh annotator folder."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with annotator_folder(tmp_path, allow_annotator_downloads=True):
        yield tmp_path


def _log(url):
    return urllib.request.urlopen(f"{url}/log", timeout=5).read().decode()


def test_downloads_are_off_outside_the_webui():
    assert Settings().allow_annotator_downloads is False


def test_an_interrupted_download_resumes_and_the_map_comes_out(hub, online, monkeypatch, capfd):
    url, served = hub
    monkeypatch.setenv("HF_ENDPOINT", f"{url}/cut")
    out = preprocess.run("lineart_realistic", IMAGE, resolution=64, use_cache=False)
    assert out.shape == (64, 64, 3)
    saved = online / "lineart" / "sk_model.pth"
    assert saved.read_bytes() == (served / "sk_model.pth").read_bytes()
    assert not list(online.rglob("*.part"))
    size = (served / "sk_model.pth").stat().st_size
    assert f"('cut', 'sk_model.pth', 'bytes={(size - size % 2) // 2}-')" in _log(url)  # the second GET resumed
    assert "Downloading sk_model.pth" in capfd.readouterr().err  # progress on the console


def test_a_space_file_lands_where_the_other_extension_keeps_it(hub, online, monkeypatch):
    url, served = hub
    monkeypatch.setenv("HF_ENDPOINT", f"{url}/ok")
    assert download.file_url("LiheYoung/Depth-Anything", "checkpoints/depth_anything_vitl14.pth", "space") == \
        f"{url}/ok/spaces/LiheYoung/Depth-Anything/resolve/main/checkpoints/depth_anything_vitl14.pth"
    path = weights.find_weight("depth_anything_vitl14.pth", "depth_anything")
    assert path == online / "depth_anything" / "depth_anything_vitl14.pth"
    assert path.read_bytes() == (served / "depth_anything_vitl14.pth").read_bytes()


def test_a_wrong_hash_is_rejected_and_nothing_is_kept(hub, online, monkeypatch):
    url, served = hub
    monkeypatch.setenv("HF_ENDPOINT", f"{url}/badsha")
    with pytest.raises(AnnotatorWeightsError, match=r"sk_model.pth downloaded from .* has sha256 [0-9a-f]{64}, "
                                                    r"not the published [0-9a-f]{64}, and was deleted"):
        weights.find_weight("sk_model.pth", "lineart")
    assert not [p for p in online.rglob("*") if p.is_file()]
    # the registry's own hash wins over the server's: a good server, a registry hash that does not match
    monkeypatch.setenv("HF_ENDPOINT", f"{url}/ok")
    good = hashlib.sha256((served / "sk_model.pth").read_bytes()).hexdigest()
    target = online / "x" / "sk_model.pth"
    source = download.file_url("lllyasviel/Annotators", "sk_model.pth")
    with pytest.raises(download.DownloadError, match=f"not the published {'0' * 64}"):
        download.download(source, target, sha256="0" * 64)
    assert download.download(source, target, sha256=good).read_bytes() == (served / "sk_model.pth").read_bytes()


def test_a_stalled_server_times_out_with_one_sentence(hub, online, monkeypatch):
    url, _ = hub
    monkeypatch.setenv("HF_ENDPOINT", f"{url}/stall")
    monkeypatch.setattr(download, "DOWNLOAD_TIMEOUT", 0.5)
    with pytest.raises(AnnotatorWeightsError) as info:
        preprocess.run("lineart_realistic", IMAGE, resolution=64, use_cache=False)
    message = str(info.value)
    source = f"{url}/stall/lllyasviel/Annotators/resolve/main/sk_model.pth"
    assert message == (f"Could not download sk_model.pth from {source} (no answer within the timeout); "
                       f"download it by hand into {online / 'lineart'} from {source}.")


def test_offline_is_one_sentence_and_no_request(hub, online, monkeypatch):
    url, _ = hub
    monkeypatch.setenv("HF_ENDPOINT", f"{url}/offline-check")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AnnotatorWeightsError, match=r"Could not download sk_model.pth: Hugging Face downloads are "
                                                    r"off here \(HF_HUB_OFFLINE is set\); download it by hand"):
        preprocess.run("lineart_realistic", IMAGE, resolution=64, use_cache=False)
    assert "offline-check" not in _log(url)
