"""The fastadv command: the happy paths on every kind of data, and bad input giving a clear
message, a non-zero exit status, and no existing file overwritten."""
import json

import numpy as np
import pytest
import torch

from fastadv.cli import main
from fastadv.models import MLP

EPS = "0.2"


@pytest.fixture
def cnn_ckpt(tmp_path, trained_models):
    path = tmp_path / "cnn.pt"
    torch.save(trained_models["cnn"].state_dict(), path)
    return path


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def fails(capsys, *argv, match):
    rc, out, err = run(capsys, *argv)
    assert rc == 1, f"expected failure, got {rc}: {out}{err}"
    assert match in err, err
    assert "Traceback" not in err
    return err


def write_pngs(root, digits, per_class=6, size=None):
    from PIL import Image

    (x, y), _ = digits
    for c in range(10):
        (root / f"class_{c}").mkdir(parents=True)
        for i, idx in enumerate((y == c).nonzero().squeeze(1)[:per_class].tolist()):
            a = (x[idx, 0].numpy() * 255).round().astype(np.uint8)
            Image.fromarray(a, mode="L").save(root / f"class_{c}" / f"{i}.png")
    return root


# -- happy paths ----------------------------------------------------------------------------

def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "eval" in out


def test_train_then_eval_on_digits(tmp_path, capsys):
    ckpt, report = tmp_path / "m.pt", tmp_path / "r.json"
    rc, out, _ = run(capsys, "train", "--method", "fgsm-rs", "--eps", EPS, "--epochs", "2", "--limit", "256",
                     "--out", ckpt, "--quiet")
    assert rc == 0 and ckpt.exists()
    assert "### Training: fgsm-rs on digits" in out and "clean accuracy" in out
    rc, out, _ = run(capsys, "eval", "--checkpoint", ckpt, "--attack", "fgsm", "--attack", "pgd-5", "--eps", EPS,
                     "--limit", "64", "--report", report, "--quiet")
    assert rc == 0
    r = json.loads(report.read_text())
    assert [a["name"] for a in r["attacks"]] == ["fgsm", "pgd-5"] and r["n"] == 64
    assert r["robust"] <= r["attacks"][0]["robust"] <= r["clean"]["correct"]
    assert "| + pgd-5 | Linf |" in out and "**Robust accuracy:" in out


def test_user_model_is_recorded_in_the_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "mlp.pt"
    rc, _, _ = run(capsys, "train", "--method", "plain", "--epochs", "1", "--limit", "128", "--model",
                   "fastadv.models:MLP", "--model-args", '{"hidden": 32}', "--out", ckpt, "--quiet")
    assert rc == 0
    rc, out, _ = run(capsys, "eval", "--checkpoint", ckpt, "--attack", "fgsm", "--eps", EPS, "--limit", "32", "--quiet")
    assert rc == 0 and "Robust accuracy" in out  # rebuilt as MLP(hidden=32) from the checkpoint


def test_image_folder_data(tmp_path, capsys, digits):
    root = write_pngs(tmp_path / "imgs", digits)
    ckpt = tmp_path / "m.pt"
    rc, out, err = run(capsys, "train", "--data", root, "--method", "plain", "--epochs", "2", "--out", ckpt, "--quiet")
    assert rc == 0, err
    assert "60 samples" in out
    rc, out, err = run(capsys, "eval", "--data", root, "--checkpoint", ckpt, "--attack", "fgsm", "--eps", EPS, "--quiet")
    assert rc == 0, err
    assert "60 samples" in out


@pytest.mark.parametrize("kind", ["npz-nhwc-uint8", "pt-tuple-float"])
def test_array_file_data(tmp_path, capsys, cnn_ckpt, digits, kind):
    _, (x, y) = digits
    if kind == "npz-nhwc-uint8":
        path = tmp_path / "d.npz"
        np.savez(path, images=(x[:40].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8), labels=y[:40].numpy())
    else:
        path = tmp_path / "d.pt"
        torch.save((x[:40], y[:40]), path)
    rc, out, err = run(capsys, "eval", "--data", path, "--checkpoint", cnn_ckpt, "--attack", "fgsm", "--eps", EPS, "--quiet")
    assert rc == 0, err
    assert "40 samples" in out


# -- bad input ------------------------------------------------------------------------------

def test_unknown_method_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--method", "madry", "--eps", EPS, "--out", str(tmp_path / "m.pt")])
    assert e.value.code == 2
    assert "invalid choice: 'madry'" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_missing_eps_for_adversarial_training(tmp_path, capsys):
    fails(capsys, "train", "--method", "pgd", "--out", tmp_path / "m.pt", match="--eps is required")


def test_unknown_attack(tmp_path, capsys, cnn_ckpt):
    fails(capsys, "eval", "--checkpoint", cnn_ckpt, "--attack", "pgd,deepfoo", "--eps", EPS, "--report",
          tmp_path / "r.json", match="unknown attack 'deepfoo'")
    assert not (tmp_path / "r.json").exists()


def test_attack_missing_from_this_build(tmp_path, capsys, cnn_ckpt, monkeypatch):
    from fastadv.attacks import REGISTRY

    monkeypatch.setitem(REGISTRY, "Square", ("square_not_written_yet", "square"))
    fails(capsys, "eval", "--checkpoint", cnn_ckpt, "--attack", "square", "--eps", EPS,
          match="fastadv.Square is not available in this build")


def test_checkpoint_of_another_model(tmp_path, capsys):
    ckpt = tmp_path / "mlp.pt"
    torch.save(MLP().state_dict(), ckpt)
    err = fails(capsys, "eval", "--checkpoint", ckpt, "--attack", "fgsm", "--eps", EPS,
                match="does not match the model fastadv.models:SmallCNN")
    assert "net.1.weight" in err  # names the offending keys


def test_unreadable_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "bad.pt"
    ckpt.write_bytes(b"\x00garbage" * 20)
    fails(capsys, "eval", "--checkpoint", ckpt, "--attack", "fgsm", "--eps", EPS, match="cannot read checkpoint")
    fails(capsys, "eval", "--checkpoint", tmp_path / "none.pt", "--attack", "fgsm", "--eps", EPS, match="does not exist")


def test_bad_model_spec(tmp_path, capsys):
    fails(capsys, "train", "--method", "plain", "--model", "no_such_pkg.models:Net", "--out", tmp_path / "m.pt",
          match="cannot import 'no_such_pkg.models'")
    fails(capsys, "train", "--method", "plain", "--model", "fastadv.models:Nope", "--out", tmp_path / "m.pt",
          match="has no attribute 'Nope'")


def test_empty_and_broken_data_folders(tmp_path, capsys, cnn_ckpt, digits):
    base = ["eval", "--checkpoint", cnn_ckpt, "--attack", "fgsm", "--eps", EPS, "--data"]
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(capsys, *base, empty, match="has no class sub-folders")
    (empty / "cat").mkdir()
    fails(capsys, *base, empty, match="but no images")
    broken = write_pngs(tmp_path / "broken", digits, per_class=1)
    (broken / "class_3" / "zz.png").write_bytes(b"not a png at all")
    err = fails(capsys, *base, broken, match="cannot read image")
    assert "zz.png" in err
    mixed = write_pngs(tmp_path / "mixed", digits, per_class=1)
    from PIL import Image

    Image.new("L", (9, 9)).save(mixed / "class_5" / "z.png")
    fails(capsys, *base, mixed, match="all images must have the same size")
    fails(capsys, *base, tmp_path / "nowhere", match="neither 'digits' nor an existing folder")


def test_labels_outside_the_models_classes(tmp_path, capsys, cnn_ckpt, digits):
    _, (x, y) = digits
    path = tmp_path / "d.npz"
    labels = y[:20].numpy().copy()
    labels[3] = 12
    np.savez(path, x=x[:20].numpy(), y=labels)
    fails(capsys, "eval", "--data", path, "--checkpoint", cnn_ckpt, "--attack", "fgsm", "--eps", EPS,
          match="lie in [0, 12] but the model has 10 classes")


def test_out_is_not_overwritten_without_overwrite(tmp_path, capsys):
    out = tmp_path / "m.pt"
    out.write_bytes(b"precious")
    fails(capsys, "train", "--method", "plain", "--epochs", "1", "--limit", "64", "--out", out,
          match="already exists; pass --overwrite")
    assert out.read_bytes() == b"precious"
    rc, _, _ = run(capsys, "train", "--method", "plain", "--epochs", "1", "--limit", "64", "--out", out, "--overwrite", "--quiet")
    assert rc == 0 and out.read_bytes() != b"precious"


def test_report_is_not_overwritten_and_no_work_starts(tmp_path, capsys, cnn_ckpt):
    report, state = tmp_path / "r.json", tmp_path / "s.pt"
    report.write_text("{}")
    fails(capsys, "eval", "--checkpoint", cnn_ckpt, "--attack", "fgsm", "--eps", EPS, "--report", report,
          "--state", state, match="already exists")
    assert report.read_text() == "{}" and not state.exists()
    fails(capsys, "eval", "--checkpoint", cnn_ckpt, "--attack", "fgsm", "--eps", EPS, "--report", state,
          "--state", state, match="name the same file")


def test_state_file_of_another_evaluation(tmp_path, capsys, cnn_ckpt):
    state = tmp_path / "s.pt"
    common = ["eval", "--checkpoint", cnn_ckpt, "--attack", "fgsm", "--limit", "64", "--state", state, "--quiet"]
    rc, _, _ = run(capsys, *common, "--eps", "0.1")
    assert rc == 0
    before = state.read_bytes()
    err = fails(capsys, *common, "--eps", EPS, "--report", tmp_path / "r.json", match="belongs to another evaluation")
    assert "eps: state file has 0.1, this run 0.2" in err
    assert state.read_bytes() == before and not (tmp_path / "r.json").exists()
    state.write_bytes(before[:100])
    fails(capsys, *common, "--eps", "0.1", match="corrupt or truncated")
    assert state.read_bytes() == before[:100]


# -- attack names and the evaluation's own checks --------------------------------------------

def test_attack_names_resolve_with_step_suffixes():
    from fastadv.evaluate import EvaluationError, attack_spec, parse_attack_list

    assert parse_attack_list(["pgd,fgsm", "pgd-50"]) == ["pgd", "fgsm", "pgd-50"]
    assert attack_spec("pgd").name == "pgd-20" and attack_spec("PGD-50").params["steps"] == 50
    assert attack_spec("pgdl2-7").norm == "L2"
    with pytest.raises(EvaluationError, match="takes no -N steps suffix"):
        attack_spec("fgsm-3")
    with pytest.raises(EvaluationError, match="unknown attack 'pgd-x'"):
        attack_spec("pgd-x")
    with pytest.raises(EvaluationError, match="empty attack name"):
        parse_attack_list(["pgd,"])


def test_an_attack_leaving_its_threat_model_is_an_error(digits, trained_models):
    from fastadv.evaluate import AttackSpec, EvaluationError, evaluate

    _, (x, y) = digits
    cheat = AttackSpec("cheat", "Linf", lambda model, eps, n: (lambda xb, yb: (xb + 2 * eps).clamp(0, 1)))
    with pytest.raises(EvaluationError, match="outside its threat model"):
        evaluate(trained_models["cnn"], x[:16], y[:16], [cheat], eps=0.1)
    with pytest.raises(EvaluationError, match="duplicates"):
        evaluate(trained_models["cnn"], x[:16], y[:16], ["fgsm", "fgsm"], eps=0.1)
