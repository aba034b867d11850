"""Pruned YOLOs fine-tuned with Ultralytics' own trainer (issue "Detectors end to end")."""

import pytest
import torch

ultralytics = pytest.importorskip("ultralytics")
pytest.importorskip("sklearn")
from ultralytics import YOLO  # noqa: E402
from ultralytics.nn.tasks import DetectionModel, SegmentationModel  # noqa: E402

from benchmarks.detection.digits import make_dataset  # noqa: E402
from pruners import measure  # noqa: E402
from pruners.ultralytics import is_pruned, load_pruned, prune_yolo  # noqa: E402

IMGSZ = 64


def _yolo(cfg, cls):
    yolo = YOLO(cfg)
    yolo.model = cls(cfg, nc=10, verbose=False)  # the generated dataset's ten digit classes
    return yolo


def _train(yolo, data, project, name, **kw):
    return yolo.train(data=str(data), epochs=kw.pop("epochs", 1), imgsz=IMGSZ, batch=8,
                      workers=0, plots=False, device="cpu", project=str(project), name=name,
                      exist_ok=True, verbose=False, amp=False, **kw)


def _widths(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_pruned_yolo_trains_at_its_pruned_widths(tmp_path, task):
    cfg, cls = {"detect": ("yolov8n.yaml", DetectionModel),
                "segment": ("yolov8n-seg.yaml", SegmentationModel)}[task]
    data = make_dataset(tmp_path / "data", n_train=16, n_val=8, imgsz=IMGSZ, task=task)
    dense = _yolo(cfg, cls)
    dense_widths = _widths(dense.model)
    small, result = prune_yolo(dense, target_flops=0.5, imgsz=IMGSZ)
    assert _widths(dense.model) == dense_widths  # the user's YOLO is untouched
    widths = _widths(small.model)
    before = {k: v.detach().clone() for k, v in small.model.state_dict().items()}

    _train(small, data, tmp_path / "runs", "ft")
    after = small.model.state_dict()
    assert _widths(small.model) == widths  # the trainer did not rebuild from the YAML
    assert any(v.is_floating_point() and not torch.equal(v.float(), before[k].float())
               for k, v in after.items())  # and it trained
    x = torch.randn(1, 3, IMGSZ, IMGSZ)
    ratio = measure(small.model.float().eval(), x)[0] / measure(dense.model.eval(), x)[0]
    assert 0.49 <= ratio <= 0.5

    best = small.trainer.best
    reloaded = YOLO(str(best))  # plain Ultralytics loading keeps the widths ...
    assert _widths(reloaded.model) == widths and is_pruned(reloaded.model)
    onnx = reloaded.export(format="onnx", imgsz=IMGSZ)  # ... and exports them
    assert onnx and str(onnx).endswith(".onnx")
    again = load_pruned(best)  # fine-tuning again keeps them too
    _train(again, data, tmp_path / "runs", "again")
    assert _widths(again.model) == widths


def test_a_pruned_rtdetr_trains_with_its_own_trainer(tmp_path):
    from ultralytics import RTDETR
    from ultralytics.models.rtdetr.train import RTDETRTrainer
    from ultralytics.nn.tasks import RTDETRDetectionModel

    data = make_dataset(tmp_path / "data", n_train=16, n_val=8, imgsz=IMGSZ)
    dense = RTDETR("rtdetr-l.yaml")
    dense.model = RTDETRDetectionModel("rtdetr-l.yaml", nc=10, verbose=False)
    small, result = prune_yolo(dense, target_flops=0.5, imgsz=IMGSZ)
    assert type(small).__name__ == "PrunedRTDETR" and isinstance(small, RTDETR)
    assert 0.49 <= result.report.flops_ratio <= 0.5
    widths = _widths(small.model)
    _train(small, data, tmp_path / "runs", "rt")
    assert isinstance(small.trainer, RTDETRTrainer)  # its loss matching and validator
    assert _widths(small.model) == widths
    again = load_pruned(small.trainer.best)
    assert type(again).__name__ == "PrunedRTDETR" and _widths(again.model) == widths


class _Stop(Exception):
    pass


def test_resume_keeps_the_pruned_widths(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=16, n_val=8, imgsz=IMGSZ)
    small, _ = prune_yolo(_yolo("yolov8n.yaml", DetectionModel), target_flops=0.5, imgsz=IMGSZ)
    widths = _widths(small.model)

    def stop(trainer):
        if trainer.epoch == 0:
            raise _Stop  # an interrupted run: last.pt holds epoch 0 and the optimizer

    small.add_callback("on_model_save", stop)
    with pytest.raises(_Stop):
        _train(small, data, tmp_path / "runs", "int", epochs=2)
    last = tmp_path / "runs" / "int" / "weights" / "last.pt"
    resumed = load_pruned(last)
    _train(resumed, data, tmp_path / "runs", "int", epochs=2, resume=True)
    assert _widths(resumed.model) == widths
    assert resumed.trainer.start_epoch == 1  # it continued, not restarted


def test_taylor_uses_the_trainers_loss_on_the_dataset(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=16, n_val=8, imgsz=IMGSZ)
    yolo = _yolo("yolov8n.yaml", DetectionModel)
    l2 = prune_yolo(yolo, target_flops=0.5, imgsz=IMGSZ)[1]
    taylor = prune_yolo(yolo, target_flops=0.5, imgsz=IMGSZ, importance="taylor", data=str(data),
                        batches=2, batch=8)[1]
    assert 0.49 <= taylor.report.flops_ratio <= 0.5
    assert taylor.plan.kept != l2.plan.kept
    with pytest.raises(ValueError, match="needs data=<dataset YAML>"):
        prune_yolo(yolo, target_flops=0.5, imgsz=IMGSZ, importance="hessian")


def test_a_dataset_with_other_classes_is_refused_clearly(tmp_path):
    from depgraph import PruningError

    data = make_dataset(tmp_path / "data", n_train=16, n_val=8, imgsz=IMGSZ)
    small, _ = prune_yolo(YOLO("yolov8n.yaml"), target_flops=0.5, imgsz=IMGSZ)  # 80 classes
    with pytest.raises(PruningError, match="predicts 80 classes but the dataset"):
        _train(small, data, tmp_path / "runs", "nc")


def test_prune_yolo_refuses_what_it_cannot_take(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        prune_yolo(str(tmp_path / "missing.pt"), target_flops=0.5)
    with pytest.raises(TypeError, match="YOLO or RTDETR object or a checkpoint"):
        prune_yolo(torch.nn.Conv2d(3, 3, 1), target_flops=0.5)


def test_recovery_reads_calibration_images_from_the_dataset(tmp_path):
    """Issue "Recover without training": the removed channels' mean contribution, measured on
    the dataset's images, brings the pruned detector's outputs closer to the dense ones; every
    BatchNorm is re-estimated on them; the widths do not change."""
    data = make_dataset(tmp_path / "data", n_train=16, n_val=8, imgsz=IMGSZ)
    yolo = _yolo("yolov8n.yaml", DetectionModel)
    yolo.model.train()  # BatchNorm statistics of the dataset's images, as a trained model has
    from pruners.ultralytics import yolo_batches

    images = [b["img"] for b in yolo_batches(str(data), imgsz=IMGSZ, batch=8, batches=2)]
    from pruners import reestimate_bn

    reestimate_bn(yolo.model, images)
    plain = prune_yolo(yolo, target_flops=0.5, imgsz=IMGSZ)[1]
    small, result = prune_yolo(yolo, target_flops=0.5, imgsz=IMGSZ, data=str(data), batches=2,
                               batch=8, recover=("bias", "bn"))
    steps = result.report.recovery.steps
    assert [s.method for s in steps] == ["bias", "bn"] and steps[0].samples == 16
    assert steps[0].error_after < steps[0].error_before
    bns = [n for n, m in small.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert steps[1].changed == bns
    assert _widths(small.model) == _widths(plain.model)
    with pytest.raises(ValueError, match="recover=.* needs data=<dataset YAML>"):
        prune_yolo(yolo, target_flops=0.5, imgsz=IMGSZ, recover="bn")
