"""mammo2histo_link: pair construction (BCDR / BreaKHis replicas), the embedding index (exact KNN, model
fingerprint), the networks and training glue, bad input, and the demo (label-conditioned histology is classified
as its label)."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from breastgen.data.phantoms import make_benign_malignant_tile, make_mammogram
from breastgen.errors import BreastGenError
from breastgen.linking.index import EmbeddingIndex, model_fingerprint, retrieval_metrics, vote
from breastgen.linking.pairs import (ensure_pairs, items_from_datalist, make_pairs, parse_breakhis_name, read_bcdr,
                                     scan_breakhis, Item)
from breastgen.networks.linking import ConvAutoencoder, DualInputAutoencoder, MammoToHisto, UNet1D, translate
from conftest import ROOT, run_bundle_cli

BUNDLE = ROOT / "bundles" / "mammo2histo_link"
CONFIGS = BUNDLE / "configs"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------ index
def _brute(vectors: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    v, q = vectors.astype(np.float64), queries.astype(np.float64)
    if metric == "cosine":
        return 1 - (q @ v.T) / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(v, axis=1)[None]
    if metric == "manhattan":
        return np.abs(q[:, None] - v[None]).sum(-1)
    return np.sqrt(((q[:, None] - v[None]) ** 2).sum(-1))


@pytest.mark.parametrize("metric", ["cosine", "manhattan", "euclidean"])
def test_index_returns_the_exact_nearest_neighbours(metric):
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((400, 12)).astype(np.float32)
    vectors[:50] += 3.0  # a cluster: the three metrics disagree about some neighbours
    queries = rng.standard_normal((30, 12)).astype(np.float32)
    index = EmbeddingIndex(vectors, [f"v{i}" for i in range(400)], "model-a")
    dist, idx = index.search(queries, k=5, metric=metric)
    ref = _brute(vectors, queries, metric)
    ref_idx = np.argsort(ref, axis=1, kind="stable")[:, :5]
    assert np.array_equal(idx, ref_idx)
    assert np.allclose(dist, np.take_along_axis(ref, ref_idx, 1), rtol=1e-10, atol=1e-10)
    assert np.array_equal(index.search(queries, 5, metric, algorithm="ball_tree")[1], ref_idx)  # trees agree


def test_the_three_distances_rank_differently():
    # a sanity check of the test above: the metrics are not aliases of each other
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((200, 6))
    vectors[:100] *= np.linspace(0.2, 3, 100)[:, None]
    index = EmbeddingIndex(vectors, range(200), "m")
    q = rng.standard_normal((20, 6))
    ranks = {m: index.search(q, 3, m)[1].tolist() for m in ("cosine", "manhattan", "euclidean")}
    assert ranks["cosine"] != ranks["euclidean"] and ranks["manhattan"] != ranks["euclidean"]


def test_index_persists_and_refuses_another_models_embeddings(tmp_path):
    net_a, net_b = ConvAutoencoder(1, (4, 4), 16), ConvAutoencoder(1, (4, 4), 16)
    hash_a, hash_b = model_fingerprint(net_a), model_fingerprint(net_b)
    assert hash_a != hash_b
    copy = ConvAutoencoder(1, (4, 4), 16)
    copy.load_state_dict(net_a.state_dict())
    assert model_fingerprint(copy) == hash_a  # the weights, not the object, define the model

    x = torch.rand(6, 1, 16, 16)
    with torch.no_grad():
        vecs = net_a.embed(x).numpy()
    index = EmbeddingIndex(vecs, [f"m{i}" for i in range(6)], hash_a, [0, 1, 0, 1, 1, 0],
                           [f"h{i}.png" for i in range(6)], ["benign", "malignant"])
    path = index.save(tmp_path / "index.npz")
    again = EmbeddingIndex.load(path, hash_a)
    assert again.ids == index.ids and again.links == index.links and again.labels.tolist() == [0, 1, 0, 1, 1, 0]
    assert np.array_equal(again.search(vecs, 2)[1], index.search(vecs, 2)[1])
    assert again.search(vecs, 1)[1][:, 0].tolist() == list(range(6))  # each vector is its own nearest neighbour

    with pytest.raises(BreastGenError, match="holds embeddings of another model") as e:
        EmbeddingIndex.load(path, hash_b)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    with torch.no_grad():
        other = net_b.embed(x).numpy()
    with pytest.raises(BreastGenError, match="another model"):
        again.add(other, ["n0"] * 0 + [f"n{i}" for i in range(6)], hash_b)
    again.add(other, [f"n{i}" for i in range(6)], hash_a)  # same model: fine
    assert len(again) == 12
    with pytest.raises(BreastGenError, match="ids already in the index: m0"):
        again.add(vecs[:1], ["m0"], hash_a)


def test_empty_index_and_bad_queries_are_one_line(tmp_path):
    empty = EmbeddingIndex(np.zeros((0, 4)), [], "m")
    with pytest.raises(BreastGenError, match="the embedding index is empty"):
        empty.search(np.ones((1, 4)))
    with pytest.raises(BreastGenError, match="refusing to save an empty index"):
        empty.save(tmp_path / "e.npz")
    np.savez(tmp_path / "e.npz", vectors=np.zeros((0, 4), np.float32), ids=np.zeros(0, str), links=np.zeros(0, str),
             labels=np.zeros(0, np.int64), header=np.asarray(json.dumps({"format": "breastgen-embedding-index",
                                                                        "version": 1, "model_hash": "m"})))
    with pytest.raises(BreastGenError, match="the embedding index is empty") as e:
        EmbeddingIndex.load(tmp_path / "e.npz")
    assert str(tmp_path / "e.npz") in str(e.value)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(BreastGenError, match="not an embedding index"):
        EmbeddingIndex.load(tmp_path / "junk.npz")
    with pytest.raises(BreastGenError, match="embedding index not found"):
        EmbeddingIndex.load(tmp_path / "missing.npz")
    index = EmbeddingIndex(np.eye(4), list("abcd"), "m")
    with pytest.raises(BreastGenError, match="query embeddings have 3 dimensions, the index 4"):
        index.search(np.ones((1, 3)))
    with pytest.raises(BreastGenError, match=r"k must be an integer in 1\.\.4"):
        index.search(np.ones((1, 4)), k=5)
    with pytest.raises(BreastGenError, match="unknown distance 'chebyshev'"):
        index.search(np.ones((1, 4)), metric="chebyshev")
    with pytest.raises(BreastGenError, match="NaN or infinite"):
        index.search(np.full((1, 4), np.nan))
    with pytest.raises(BreastGenError, match="duplicate ids"):
        EmbeddingIndex(np.eye(2), ["a", "a"], "m")


def test_vote_and_retrieval_metrics():
    labels = np.array([[1, 1, 0], [0, 1, 1], [0, 1, -1], [1, 0, -1], [-1, -1, -1]])
    assert vote(labels).tolist() == [1, 1, 0, 1, -1]  # ties go to the nearest neighbour's label
    m = retrieval_metrics([0, 0, 1, 1, 1], [0, 1, 1, 1, 0])
    assert m["accuracy"] == pytest.approx(0.6) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert (m["cm_benign_benign"], m["cm_benign_malignant"], m["cm_malignant_benign"], m["cm_malignant_malignant"]) \
        == (1, 1, 1, 2)


# ------------------------------------------------------------------------------------------------ pairs
def _bcdr_replica(root: Path) -> Path:
    """BCDR-like folder: TIFF phantoms in patient/study folders, an outlines CSV with BCDR's columns and spacing."""
    rows = []
    lesions = [("1", "Benign", 2), ("2", "Benign", 1), ("3", "Benign", 1), ("4", "Benign", 1),
               ("5", "Malignant", 2), ("6", "Malignant", 1), ("7", "Malignant", 1), ("8", "Malignant", 1)]
    for pid, cls, n in lesions:
        for lesion in range(1, n + 1):
            m = make_mammogram(int(pid) * 10 + lesion, (128, 104), lesion=cls.lower(), view="CC")
            rel = f"patient_{pid}/study_{pid}/img_{pid}_{lesion}_RCC.tif"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(root / rel, m.image)
            ys, xs = np.nonzero(m.lesion_mask)
            for seg in (1, 2):  # two outlines of the same lesion: one item
                rows.append({"patient_id": pid, "study_id": pid, "series": 1, "lesion_id": lesion,
                             "segmentation_id": seg, "image_view": "RCC", "image_filename": rel,
                             "lw_x_points": " " + " ".join(map(str, xs[:40])), "lw_y_points": " " + " ".join(map(str, ys[:40])),
                             "mammography_nodule": 1, "age": 50, "density": 2, "classification": f" {cls}"})
    rows.append({**rows[0], "patient_id": "9", "lesion_id": 1, "classification": " Normal"})
    csv_file = root / "bcdr_d01_outlines.csv"
    with open(csv_file, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return csv_file


_SUBTYPE = {"benign": ("A", "adenosis"), "malignant": ("DC", "ductal_carcinoma")}


def _breakhis_replica(root: Path, patients_per_class: int = 4) -> Path:
    base = root / "BreaKHis_v1" / "histology_slides" / "breast"
    for label, letter in (("benign", "B"), ("malignant", "M")):
        code, folder = _SUBTYPE[label]
        for p in range(patients_per_class):
            patient = f"14-{2000 + p}{letter}"
            for mag, count in ((40, 2), (100, 1)):
                d = base / label / "SOB" / folder / f"SOB_{letter}_{code}_{patient}" / f"{mag}X"
                d.mkdir(parents=True, exist_ok=True)
                for k in range(1, count + 1):
                    tile = make_benign_malignant_tile(p * 10 + k + mag, 48, label)["image"]
                    Image.fromarray(tile).save(d / f"SOB_{letter}_{code}-{patient}-{mag}-{k:03d}.png")
    return root / "BreaKHis_v1"


def test_breakhis_names_parse_and_must_fit_their_folders(tmp_path):
    f = parse_breakhis_name("SOB_B_A-14-22549AB-40-001.png")
    assert f == {"label": "benign", "subtype": "adenosis", "patient": "14-22549AB", "magnification": 40, "seq": 1}
    assert parse_breakhis_name("SOB_M_DC-14-2523-400-016.png")["subtype"] == "ductal_carcinoma"
    with pytest.raises(BreastGenError, match="not a BreaKHis file name"):
        parse_breakhis_name("tile_001.png")
    with pytest.raises(BreastGenError, match="unknown BreaKHis tumour type 'XX'"):
        parse_breakhis_name("SOB_B_XX-14-22549AB-40-001.png")
    root = _breakhis_replica(tmp_path, 2)
    items = scan_breakhis(root)
    assert len(items) == 2 * 2 * 3 and {i.label for i in items} == {"benign", "malignant"}
    assert len(scan_breakhis(root.parent, magnifications=[100])) == 4  # the folder holding BreaKHis_v1 works too
    stray = next((root / "histology_slides/breast/benign").rglob("*-40-001.png"))
    shutil.copy(stray, stray.parent / stray.name.replace("SOB_B_A", "SOB_M_DC"))
    with pytest.raises(BreastGenError, match=r"do not fit the layout: .*a malignant name in the benign folder"):
        scan_breakhis(root)


def test_prepare_pairs_bcdr_breakhis_replica_label_matched_and_patient_disjoint(tmp_path, capsys):
    bcdr = tmp_path / "BCDR-D01_dataset"
    csv_file = _bcdr_replica(bcdr)
    breakhis = _breakhis_replica(tmp_path)
    out = tmp_path / "pairs"
    args = ["bcdr-breakhis", "--bcdr", str(bcdr), "--bcdr-csv", str(csv_file), "--breakhis", str(breakhis),
            "--magnification", "40", "--out", str(out), "--pairs-per-mammogram", "2", "--val-fraction", "0.25",
            "--test-fraction", "0.25", "--seed", "3"]
    summary = _script("prepare_mammo2histo").main(args)
    assert "1 CSV row(s) skipped" in capsys.readouterr().out
    assert summary["mammograms"] == 10 and summary["histology"] == 16  # 10 lesions (not 20 outlines), 40X only
    assert summary["skipped"][0]["reason"] == "classification 'Normal' is neither benign nor malignant"
    pairs = json.loads((out / "pairs.json").read_text())
    histo = json.loads((out / "histology.json").read_text())
    assert sum(len(v) for v in pairs.values()) == 2 * 10
    patients, histo_patients = {}, {}
    for section, entries in pairs.items():
        assert entries, section  # every section holds pairs of ...
        assert {e["class"] for e in entries} == {"benign", "malignant"}  # ... both pathologies
        for e in entries:
            assert e["class"] == ("benign" if e["label"] == 0 else "malignant")
            assert ("_B_" in Path(e["histo"]).name) == (e["class"] == "benign")  # the histology's own label
            assert e["magnification"] == 40 and len(e["bbox"]) == 4
            assert (out / e["mammo"]).is_file() or Path(e["mammo"]).is_file()
            patients.setdefault(e["patient"], set()).add(section)
            histo_patients.setdefault(e["histo_patient"], set()).add(section)
    for section, entries in histo.items():
        for e in entries:
            histo_patients.setdefault(e["histo_patient"], set()).add(section)
    assert all(len(s) == 1 for s in patients.values()), patients  # patient-disjoint: mammograms ...
    assert all(len(s) == 1 for s in histo_patients.values()), histo_patients  # ... and histology
    # a fixed seed gives the same pairs; another seed another pairing
    out2, out3 = tmp_path / "p2", tmp_path / "p3"
    _script("prepare_mammo2histo").main([a if a != str(out) else str(out2) for a in args])
    _script("prepare_mammo2histo").main([a if a != str(out) else str(out3) for a in args[:-1]] + ["4"])
    same = json.loads((out2 / "pairs.json").read_text())
    other = json.loads((out3 / "pairs.json").read_text())
    key = lambda d: sorted((e["mammo_id"], e["histo_id"]) for v in d.values() for e in v)  # noqa: E731
    assert key(same) == key(pairs) and key(other) != key(pairs)


def test_bcdr_outline_gives_the_lesion_box(tmp_path):
    csv_file = _bcdr_replica(tmp_path)
    items, skipped = read_bcdr(tmp_path, [csv_file])
    first = next(i for i in items if i.patient == "1")
    m = make_mammogram(11, (128, 104), lesion="benign", view="CC")
    ys, xs = np.nonzero(m.lesion_mask)
    assert first.extra["bbox"] == [int(xs[:40].min()), int(ys[:40].min()), int(xs[:40].max()) + 1,
                                   int(ys[:40].max()) + 1]
    assert len(skipped) == 1


def test_prepare_errors_are_one_line_and_write_nothing(tmp_path):
    bcdr = tmp_path / "bcdr"
    csv_file = _bcdr_replica(bcdr)
    breakhis = _breakhis_replica(tmp_path)
    (bcdr / "patient_6/study_6/img_6_1_RCC.tif").unlink()
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts" / "prepare_mammo2histo.py"), "bcdr-breakhis", "--bcdr", str(bcdr),
           "--bcdr-csv", str(csv_file), "--breakhis", str(breakhis), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(f"error: {csv_file}: 1 image file(s) not found below {bcdr}: "
                               "patient_6/study_6/img_6_1_RCC.tif (bcdr_d01_outlines.csv:")
    assert not out.exists()


def test_unmatched_labels_are_refused():
    mammos = [Item(f"m{i}", Path(f"m{i}.tif"), lab, f"p{i}") for i, lab in enumerate(["benign", "malignant"] * 3)]
    benign_only = [Item(f"h{i}", Path(f"h{i}.png"), "benign", f"q{i}") for i in range(6)]
    with pytest.raises(BreastGenError, match="unmatched labels: 3 malignant mammogram\\(s\\) but no malignant histology"):
        make_pairs(mammos, benign_only)
    # every label has histology, but not in every section after the patient split
    one_malignant = benign_only + [Item("hm", Path("hm.png"), "malignant", "qm")]
    with pytest.raises(BreastGenError, match="unmatched labels after the patient split"):
        make_pairs(mammos, one_malignant, val_fraction=0.2, test_fraction=0.3)


def test_demo_pairs_are_built_once_from_the_demo_datalists(demo_data, tmp_path):
    mammo, histo = demo_data / "mammo" / "datalist.json", demo_data / "histo" / "breakhis_like" / "datalist.json"
    path = Path(ensure_pairs(mammo, histo, tmp_path, pairs_per_mammogram=2, seed=0, histo_label_key="class"))
    stamp = (tmp_path / "summary.json").stat().st_mtime_ns
    assert ensure_pairs(mammo, histo, tmp_path, pairs_per_mammogram=2, seed=0, histo_label_key="class") == str(path)
    assert (tmp_path / "summary.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    lesions = items_from_datalist(mammo)
    assert {i.label for i in lesions} == {"benign", "malignant"}  # 'normal' phantoms are left out
    pairs = json.loads(path.read_text())
    assert sum(len(v) for v in pairs.values()) == 2 * len(lesions)


# ------------------------------------------------------------------------------------------------ networks
def test_networks_shapes_and_size_checks():
    ae = ConvAutoencoder(1, (4, 8, 8, 8, 8), 64)
    x = torch.rand(3, 1, 64, 64)
    assert ae(x).shape == x.shape and ae.embed(x).shape == (3, 8 * 2 * 2) == (3, ae.embed_dim)
    assert ae.condition(x, "crossattn").shape == (3, 4, 8)
    assert ae.condition(x, "concat", 16).shape == (3, 8, 16, 16)
    with pytest.raises(BreastGenError, match=r"takes \(1, 64, 64\) images, got \(1, 32, 32\)"):
        ae.embed(torch.rand(1, 1, 32, 32))
    with pytest.raises(BreastGenError, match="must be a multiple of 2\\^5"):
        ConvAutoencoder(1, (4, 8, 8, 8, 8), 48)
    unet = UNet1D(1, 1, (4, 4, 8, 8, 8))
    assert unet(torch.rand(2, 1, 64)).shape == (2, 1, 64)
    with pytest.raises(BreastGenError, match="not a multiple of 2\\^5"):
        unet(torch.rand(2, 1, 48))
    single = MammoToHisto(64, 32, encoder_channels=(4, 8, 8, 8, 8), decoder_channels=(4, 8, 8, 8, 8),
                          unet_channels=(4, 4, 8, 8, 8))
    dual = DualInputAutoencoder(64, 32, encoder_channels=(4, 8, 8, 8, 8), histo_encoder_channels=(4, 8, 8, 8, 8),
                                fused_dim=16)
    assert translate(single, x).shape == (3, 3, 32, 32)
    m_hat, h_hat = dual(x, torch.rand(3, 3, 32, 32))
    assert m_hat.shape == x.shape and h_hat.shape == (3, 3, 32, 32)
    assert translate(dual, x).shape == (3, 3, 32, 32) and dual.training  # mode restored
    with pytest.raises(BreastGenError, match="takes histology of shape \\(3, 32, 32\\)"):
        dual(x, torch.rand(3, 1, 32, 32))


def test_paired_batch_drops_inputs_and_conditional_batch_hands_over_all_conditionings():
    from monai.networks.schedulers import DDPMScheduler

    from breastgen.engines.conditional import ConditionalDiffusionInferer, ConditionalPrepareBatch
    from breastgen.linking.engine import MultiOutputLoss, PairedBatch

    torch.manual_seed(0)
    batch = {"mammo": torch.ones(400, 1, 4, 4), "histo": torch.ones(400, 3, 2, 2), "label": torch.zeros(400).long()}
    x, target, args, _ = PairedBatch(["mammo", "histo"], ["mammo", "histo"], drop={"histo": 0.5})(batch)
    dropped = (args[0].flatten(1).sum(1) == 0).float().mean()
    assert 0.4 < dropped < 0.6 and bool((x == 1).all()) and isinstance(target, tuple)
    assert bool((target[1] == 1).all())  # targets are never dropped
    assert float(MultiOutputLoss()((x * 0, target[1]), target)) == pytest.approx(1.0)
    with pytest.raises(BreastGenError, match="input dropout must name inputs"):
        PairedBatch("mammo", "mammo", drop={"histo": 0.5})

    seen = {}

    def model(x, timesteps, **kw):
        seen.update(kw, x=x)
        return x[:, :2]

    prep = ConditionalPrepareBatch(10, class_key="label", context_key="ctx", concat_key="map")
    data = {"image": torch.rand(2, 2, 4, 4), "label": torch.tensor([1, 0]), "ctx": torch.rand(2, 3, 5),
            "map": torch.rand(2, 1, 4, 4)}
    images, target, _, kwargs = prep(data)
    assert torch.equal(target, kwargs["noise"]) and set(kwargs) == {"noise", "timesteps", "class_labels", "context",
                                                                     "concat"}
    ConditionalDiffusionInferer(DDPMScheduler(10))(images, model, **kwargs)
    assert seen["x"].shape == (2, 3, 4, 4) and torch.equal(seen["class_labels"], torch.tensor([1, 0]))
    assert torch.equal(seen["context"], data["ctx"])


def test_input_checks_name_the_file(tmp_path):
    from breastgen.linking.transforms import CheckImaged, CropToBoxd, ZeroWhereLabeld
    from monai.data import MetaTensor

    rgb = MetaTensor(torch.rand(3, 80, 80), meta={"filename_or_obj": "tile.png"})
    with pytest.raises(BreastGenError, match=r"tile.png: expected a grey mammogram with 1 channel\(s\), got 3 channels "
                                             r"\(an RGB image: histology\?\)"):
        CheckImaged("mammo", channels=1, min_size=64)({"mammo": rgb})
    small = MetaTensor(torch.rand(1, 40, 30), meta={"filename_or_obj": "thumb.png"})
    with pytest.raises(BreastGenError, match="thumb.png: image of 40 x 30 px is too small for a grey mammogram"):
        CheckImaged("mammo", channels=1, min_size=64)({"mammo": small})
    img = torch.arange(100.0).view(1, 10, 10)
    out = CropToBoxd("mammo", roi="lesion", margin=0.5, min_size=4)({"mammo": img, "bbox": [6, 6, 8, 8]})
    assert out["mammo"].shape == (1, 4, 4) and out["bbox"] == [1.0, 1.0, 3.0, 3.0]
    assert torch.equal(out["mammo"], img[:, 5:9, 5:9])
    assert CropToBoxd("mammo", roi="image")({"mammo": img})["mammo"] is img
    with pytest.raises(BreastGenError, match="no lesion box"):
        CropToBoxd("mammo", roi="lesion")({"mammo": img})
    with pytest.raises(BreastGenError, match="unknown roi 'breast'"):
        CropToBoxd("mammo", roi="breast")
    z = ZeroWhereLabeld("ctx", label=2)
    assert z({"ctx": torch.ones(2), "label": torch.tensor(2)})["ctx"].sum() == 0
    assert z({"ctx": torch.ones(2), "label": torch.tensor(1)})["ctx"].sum() == 2


def test_write_doc_block_replaces_only_its_block(tmp_path):
    from breastgen.engines.perf import write_doc_block

    doc = tmp_path / "b.md"
    doc.write_text("# B\n\n<!-- x:start -->\nold\n<!-- x:end -->\n\ntail\n")
    write_doc_block(doc, "x", "new")
    write_doc_block(doc, "y", "other")
    assert doc.read_text() == "# B\n\n<!-- x:start -->\nnew\n<!-- x:end -->\n\ntail\n\n<!-- y:start -->\nother\n<!-- y:end -->\n"


# ------------------------------------------------------------------------------------------------ demo
@pytest.fixture(scope="module")
def demo(bundle_demo) -> Path:
    return bundle_demo(BUNDLE)


def test_demo_label_conditioned_histology_is_classified_as_its_label(demo):
    m = json.loads((demo / "metrics.json").read_text())
    assert m["classifier_real_accuracy"] >= 0.75, m  # the judge itself works on real held-out histology
    n = m["generation_samples_per_label"]
    assert n >= 16
    assert m["generation_cm_benign_benign"] + m["generation_cm_benign_malignant"] == n
    # above chance for each conditioning label, and overall significantly so
    assert m["generation_accuracy_benign"] > 0.5 and m["generation_accuracy_malignant"] > 0.5, m
    assert m["generation_p_value_vs_chance"] < 0.01, m


def test_demo_reports_table1_for_every_distance(demo):
    m = json.loads((demo / "metrics.json").read_text())
    for metric in ("cosine", "manhattan", "euclidean"):
        cm = [m[f"retrieval_{metric}_cm_{a}_{b}"] for a in ("benign", "malignant") for b in ("benign", "malignant")]
        assert sum(cm) == m["retrieval_queries"] > 0
        assert m[f"retrieval_{metric}_accuracy"] == pytest.approx((cm[0] + cm[3]) / sum(cm))
        assert 0 <= m[f"retrieval_{metric}_precision"] <= 1 and 0 <= m[f"retrieval_{metric}_recall"] <= 1
    assert m["translation_single_mse"] > 0 and m["translation_dual_mse"] > 0 and m["translation_mean_image_mse"] > 0


def test_demo_links_queries_to_retrieved_and_generated_histology(demo):
    links = json.loads((demo / "links" / "links.json").read_text())
    assert links and (demo / "links" / "gallery.png").is_file()
    for rec in links:
        assert len(rec["neighbours"]) == 3
        assert [n["distance"] for n in rec["neighbours"]] == sorted(n["distance"] for n in rec["neighbours"])
        assert all(Path(n["histology"]).is_file() for n in rec["neighbours"])
        votes = [n["label"] for n in rec["neighbours"]]
        assert rec["predicted_label"] == max(set(votes), key=votes.count)
        assert rec["generation_label"] == rec["predicted_label"]  # label_source "retrieved"
        assert len(rec["generated"]) == 2 and all(Path(p).is_file() for p in rec["generated"])
    for ckpt in (demo / "models").glob("*.pt"):  # every checkpoint loads without pickled objects
        torch.load(ckpt, weights_only=True)


@pytest.fixture(scope="module")
def parser(demo, demo_data):
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config([str(CONFIGS / f) for f in ("train.json", "inference.json", "evaluate.json", "demo.json")])
    p.update({"bundle_root": str(BUNDLE), "data_dir": str(demo_data), "output_dir": str(demo)})
    p.get_parsed_content("load")
    return p


def test_demo_generation_follows_label_and_mammogram(parser):
    from breastgen.linking.engine import classify

    from breastgen.engines import load_checkpoint

    linker, classifier = parser.get_parsed_content("linker"), parser.get_parsed_content("classifier")
    load_checkpoint(parser.get_parsed_content("classifier_ckpt"), {"network": classifier})
    cond = linker.conditioning(linker.queries(parser.get_parsed_content("eval_queries")[:2]))
    seeds = list(range(8))
    benign = linker.pipeline.sample(cond[:1], [0] * 8, seeds, num_inference_steps=10)
    malignant = linker.pipeline.sample(cond[:1], [1] * 8, seeds, num_inference_steps=10)
    assert classify(classifier, malignant)[:, 1].mean() > classify(classifier, benign)[:, 1].mean() + 0.3
    other = linker.pipeline.sample(cond[1:2], [0] * 8, seeds, num_inference_steps=10)
    assert not torch.allclose(other, benign, atol=1e-3)  # the mammogram embedding is used
    again = linker.pipeline.sample(cond[:1], [0] * 8, seeds, num_inference_steps=10)
    assert torch.equal(again, benign)  # same seeds, same samples
    with pytest.raises(BreastGenError, match="unknown label"):
        linker.pipeline.sample(cond[:1], [2], [0])


def _cli(demo_data, *extra):
    return run_bundle_cli(BUNDLE, ["train.json", "inference.json", "demo.json"], "--data_dir", str(demo_data), *extra)


def test_cli_histology_tile_as_query_is_one_line_and_writes_nothing(demo, demo_data, tmp_path):
    tile = next((demo_data / "histo" / "breakhis_like" / "benign").glob("*.png"))
    links = tmp_path / "links"
    r = _cli(demo_data, "--output_dir", str(demo), "--links_dir", str(links), "--query_files", str(tile))
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (f"error: {tile}: expected a grey mammogram with 1 channel(s), got 3 "
                                                 "channels (an RGB image: histology?)")
    assert not links.exists()


def test_cli_index_of_another_autoencoder_is_refused(demo, demo_data, tmp_path):
    shutil.copytree(demo / "index", tmp_path / "index")
    shutil.copytree(demo / "models", tmp_path / "models")
    state = torch.load(tmp_path / "models" / "autoencoder.pt", weights_only=True)
    key = next(iter(state))
    state[key] = state[key] + 0.01  # a retrained (here: nudged) autoencoder
    torch.save(state, tmp_path / "models" / "autoencoder.pt")
    r = _cli(demo_data, "--output_dir", str(tmp_path))
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path / 'index' / 'embeddings.npz'}: the index holds embeddings of another "
                           "model") and last.endswith("rebuild the index with this model")
    assert not (tmp_path / "links").exists()


def test_multi_gpu_overlay_trains_with_torchrun_on_cpu(demo, demo_data, tmp_path):
    r = run_bundle_cli(BUNDLE, ["train.json", "train_autoencoder.json", "demo.json", "multi_gpu_train.json"],
                       "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf"),
                       "--data_dir", str(demo_data), "--output_dir", str(tmp_path), "--ae_epochs", "2",
                       "--pairs_file", str(demo / "work" / "pairs" / "pairs.json"), nproc=2, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(tmp_path / "models" / "autoencoder.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # the bare network, not the DDP wrapper
