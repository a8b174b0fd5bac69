"""The `RKNN` class: each RKNN-Toolkit2 method translated onto hybridq's API (see :mod:`hybridq.rknn`)."""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx

from .. import _runtime
from .._fs import copy_atomic, write_atomic
from .._onnx import is_large, save_external
from .._version import __version__
from ..errors import InputError, ModelError, did_you_mean
from ..graph import cut_model, load_model
from ..images import normalize_input
from ..qparams import FLOAT_DTYPES
from ..settings import Settings
from . import _hybrid, _layout, _report
from ._translate import (
    NPU_ONLY_OPTIONS,
    QUANTIZED_DTYPES,
    UNSUPPORTED_DTYPES,
    UNSUPPORTED_METHODS,
    _absolute,
    _algorithm,
    _Config,
    _Failed,
    _per_input,
    _qmethod,
    _rknn_method,
    _single,
)


class RKNN:
    """RKNN-Toolkit2's `RKNN` class for ONNX models; quantization, build and analysis are hybridq's."""

    NPU_CORE_AUTO = 0x0
    NPU_CORE_0 = 0x1
    NPU_CORE_1 = 0x2
    NPU_CORE_2 = 0x4
    NPU_CORE_0_1 = 0x3
    NPU_CORE_0_1_2 = 0x7
    NPU_CORE_ALL = 0xFFFF

    def __init__(self, verbose: bool | str = False, verbose_file: str | None = None) -> None:
        self.verbose = verbose
        self._debug = verbose == "debug" or os.environ.get("HYBRIDQ_DEBUG") == "1"
        self._log_file = verbose_file if verbose else None
        self._cfg = _Config()
        self._reported: set[str] = set()
        self._tmp = Path(tempfile.mkdtemp(prefix="hybridq-rknn-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._tmp), True)
        self._model_path: Path | None = None  # what step1 reads (the ONNX file, or a cut copy named like it)
        self._float_path: Path | None = None  # fp32 reference for accuracy_analysis
        self._built: Path | None = None  # the deployable QDQ (or fp32) ONNX model
        self._built_dir: Path | None = None  # the private directory build / step2 wrote it in (None for a user's file)
        self._built_quantized = False
        self._built_pre: dict[str, Any] = {}  # preprocessing step1 recorded, read from the built model's metadata
        self._session: Any = None
        self.last_error: str | None = None

    # ------------------------------------------------------------------ logging

    def _log(self, level: str, where: str, message: str) -> None:
        """RKNN-style line: E and W always on stderr, I and D only when verbose."""
        if level == "E":
            self.last_error = message
        if level in ("I", "D") and not self.verbose:
            return
        line = f"{level} {where}: {message}"
        print(line, file=sys.stderr, flush=True)
        if self._log_file:
            try:
                with open(self._log_file, "a", encoding="utf-8") as fh:
                    fh.write(line + "\n")
            except OSError:
                self._log_file = None

    def _emit(self, where: str, lines: list[_report.Line]) -> None:
        for level, message in lines:
            self._log(level, where, message)

    def _once(self, key: str, where: str, message: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            self._log("W", where, message)

    def __getattr__(self, name: str) -> Any:
        if name in UNSUPPORTED_METHODS:
            def unsupported(*args: Any, **kwargs: Any) -> int:
                self._log("E", name, f"{name} is not available in hybridq: {UNSUPPORTED_METHODS[name]}.")
                return -1

            return unsupported
        raise AttributeError(f"RKNN has no attribute {name!r}.{did_you_mean(name, [m for m in dir(type(self)) if not m.startswith('_')])}")

    # ------------------------------------------------------------------ config

    @_rknn_method()
    def config(
        self,
        mean_values: Any = None,
        std_values: Any = None,
        quantized_dtype: str = "w8a8",
        quantized_algorithm: str = "normal",
        quantized_method: str = "channel",
        quantized_hybrid_level: int = 0,
        target_platform: str | None = None,
        quant_img_RGB2BGR: bool = False,
        float_dtype: str = "float16",
        optimization_level: int = 3,
        custom_string: str | None = None,
        remove_weight: bool = False,
        compress_weight: bool = False,
        inputs_yuv_fmt: Any = None,
        single_core_mode: bool = False,
        dynamic_input: Any = None,
        model_pruning: bool = False,
        op_target: Any = None,
        quantize_weight: bool = False,
        remove_reshape: bool = False,
        sparse_infer: bool = False,
        enable_flash_attention: bool = False,
        auto_hybrid_cos_thresh: float = 0.98,
        auto_hybrid_euc_thresh: float | None = None,
        speed_check: bool = True,
        **kwargs: Any,
    ) -> int:
        """Preprocessing and quantization options; NPU-only options are accepted and reported once.

        `speed_check` is hybridq's own (no RKNN equivalent): without `target_platform`, step1 times the int8 model
        against fp32 and keeps it float where int8 is not faster on this CPU; `speed_check=False` quantizes anyway.
        """
        known = [p for p in inspect.signature(RKNN.config).parameters if p not in ("self", "kwargs")]
        for key in kwargs:
            raise InputError(f"unknown option {key!r}.{did_you_mean(key, known)} Valid options: {', '.join(known)}.")
        cfg = _Config()
        cfg.mean_values = _per_input(mean_values, "mean_values")
        cfg.std_values = _per_input(std_values, "std_values")
        if cfg.std_values and any(v <= 0 for vals in cfg.std_values for v in vals):
            raise InputError(f"std_values {std_values!r} has a value <= 0; every std must be positive (0-255 pixel units, e.g. [[58.395, 57.12, 57.375]]).")
        key = str(quantized_dtype).strip().lower()
        if key in UNSUPPORTED_DTYPES:
            raise InputError(f"quantized_dtype {quantized_dtype!r} is not supported: {UNSUPPORTED_DTYPES[key]}.")
        if key not in QUANTIZED_DTYPES:
            raise InputError(f"quantized_dtype {quantized_dtype!r} is not valid.{did_you_mean(key, QUANTIZED_DTYPES)} Use one of: {', '.join(QUANTIZED_DTYPES)}.")
        cfg.dtype, cfg.qtype, cfg.weight_dtype = QUANTIZED_DTYPES[key]
        if key.endswith("_dfp") or key.startswith("dynamic_fixed_point"):
            self._once("dfp", "config", f"quantized_dtype {quantized_dtype!r}: dynamic fixed point (power-of-two scales) is an NPU format; "
                                        "hybridq quantizes symmetrically with the exact scale instead.")
        cfg.algorithm = _algorithm(quantized_algorithm)
        cfg.qmethod = _qmethod(quantized_method)
        cfg.bgr = bool(quant_img_RGB2BGR)
        if float_dtype not in FLOAT_DTYPES:
            raise InputError(f"float_dtype {float_dtype!r} is not valid; use 'float16' (as RKNN) or 'float32' (hybridq only).")
        cfg.float_dtype = float_dtype
        cfg.cos_thresh = float(auto_hybrid_cos_thresh)
        cfg.euc_thresh = auto_hybrid_euc_thresh
        if not isinstance(speed_check, bool):
            raise InputError(f"speed_check must be True or False, got {speed_check!r}.")
        cfg.speed_check = speed_check
        if target_platform is not None:
            cfg.target = "npu"
            self._log("I", "config", f"target_platform={target_platform!r}: settings target npu (every operator quantized, "
                                     "as an integer-only NPU runs it; SPEC 11).")
        given = dict(locals())
        for name, default in NPU_ONLY_OPTIONS.items():
            value = given[name]
            if value != default:
                cfg.npu_only[name] = value
                self._once(f"config:{name}", "config", f"{name}={value!r} only matters for Rockchip NPUs; ignored "
                                                       "(hybridq builds an ONNX model for ONNX Runtime's CPU provider).")
        self._cfg = cfg
        self._log("I", "config", f"activations {cfg.dtype} {cfg.qtype}, weights {cfg.weight_dtype} per {cfg.qmethod}, algorithm {cfg.algorithm}.")
        return 0

    # ------------------------------------------------------------------ load

    @_rknn_method()
    def load_onnx(self, model: str, inputs: list[str] | None = None, input_size_list: list[list[int]] | None = None,
                  input_initial_val: list[Any] | None = None, outputs: list[str] | None = None) -> int:
        """Load an ONNX model; `inputs`/`outputs` cut it, `input_size_list` fixes input shapes."""
        path = Path(model)
        proto = load_model(path)
        if inputs is None and outputs is None and input_size_list is None and input_initial_val is None:
            self._model_path = self._float_path = path.resolve()
            self._reset_build()
            self._log("I", "load_onnx", f"loaded {path}.")
            return 0
        cut = cut_model(proto, path, inputs, input_size_list, input_initial_val, outputs)  # a failure changes nothing
        work = self._tmp / "model"
        work.mkdir(exist_ok=True)
        out = work / f"{path.stem}.onnx"  # step1 names its artifacts by this stem, as RKNN does
        if is_large(cut):
            save_external(cut, out, out.name + ".data")
        else:
            onnx.save(cut, str(out))
        self._model_path = self._float_path = out
        self._reset_build()
        self._log("I", "load_onnx", f"loaded {path} (inputs {[i.name for i in cut.graph.input]}, outputs {[o.name for o in cut.graph.output]}).")
        return 0

    def _need_model(self) -> Path:
        if self._model_path is None:
            raise InputError("no model is loaded; call rknn.load_onnx(model='model.onnx') first.")
        return self._model_path

    def _reset_build(self) -> None:
        """Forget the built model (and delete the private directory it was built in)."""
        if self._built_dir is not None:
            shutil.rmtree(self._built_dir, ignore_errors=True)
        self._built, self._built_dir, self._built_quantized, self._built_pre, self._session = None, None, False, {}, None

    @contextlib.contextmanager
    def _staging(self, kind: str) -> Iterator[Path]:
        """A new private directory to build in; deleted when the block fails, so a failed call keeps the previous build."""
        work = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=self._tmp))
        try:
            yield work
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise

    def _set_built(self, output: Path, work: Path | None, quantized: bool) -> None:
        """Make `output` the built model (`work`: the private directory holding it); the previous build goes."""
        pre = _recorded_pre(output) if quantized else {}
        self._reset_build()
        self._built, self._built_dir, self._built_quantized, self._built_pre = output, work, quantized, pre

    # ------------------------------------------------------------------ settings from config

    def _settings(self):
        c = self._cfg
        s = Settings(dtype=c.dtype, qtype=c.qtype, weight_dtype=c.weight_dtype, qmethod=c.qmethod, algorithm=c.algorithm, target=c.target,
                     speed_check=c.speed_check)
        s.validate("rknn.config")
        return s

    def _preprocess(self, n_inputs: int):
        """hybridq's Preprocess for images read from files (dataset, accuracy_analysis)."""
        from ..dataset import Preprocess

        c = self._cfg
        mean = _single(c.mean_values, n_inputs, "mean_values")
        std = _single(c.std_values, n_inputs, "std_values")
        return Preprocess(mean=mean, std=std, color="bgr" if c.bgr else "rgb")

    def _n_inputs(self, path: Path) -> int:
        from ..dataset import input_specs

        return len(input_specs(load_model(path, load_external_data=False)))

    # ------------------------------------------------------------------ step1 / step2

    @_rknn_method()
    def hybrid_quantization_step1(self, dataset: str = "dataset.txt", rknn_batch_size: int | None = None, proposal: bool = False,
                                  proposal_dataset_size: int = 1, custom_hybrid: list[list[str]] | None = None) -> int:
        """Calibrate and write `<name>.model`, `<name>.data`, `<name>.quantization.cfg` into the current directory."""
        from .. import api

        model = self._need_model()
        if rknn_batch_size is not None:
            self._once("rknn_batch_size", "hybrid_quantization_step1", f"rknn_batch_size={rknn_batch_size!r} sets the NPU model's batch; ignored (the ONNX model keeps its own batch dim).")
        kwargs: dict[str, Any] = {}
        if proposal:
            kwargs = self._proposal_kwargs("hybrid_quantization_step1", proposal_dataset_size)
        pre = self._preprocess(self._n_inputs(model))
        hybrid = _hybrid.resolve(custom_hybrid, model) if custom_hybrid else None  # checked before anything is written
        here = Path.cwd()  # RKNN writes step1's artifacts into the current directory; every path is passed absolute
        res = api.step1(here / model, _absolute(dataset, here), out=here, settings=self._settings(), preprocess=pre, **kwargs)
        self._log("I", "hybrid_quantization_step1", f"calibrated on {res.samples} samples; {res.quantized_tensors} tensors in the cfg.")
        for p in (res.model, res.data, res.cfg):
            self._log("I", "hybrid_quantization_step1", f"wrote {p}")
        if res.backup:
            self._log("W", "hybrid_quantization_step1", f"the previous cfg had edits: kept as {res.backup}.")
        self._emit("hybrid_quantization_step1", _report.step1_lines(res))
        if res.fused:
            self._log("I", "hybrid_quantization_step1", "fused in the temp model: " + ", ".join(f"{k} -> {v or '(folded)'}" for k, v in res.fused.items()))
        if hybrid is not None:
            self._write_custom_hybrid(hybrid, res.cfg)
        return 0

    def _write_custom_hybrid(self, hybrid: _hybrid.CustomHybrid, cfg: Path) -> None:
        """custom_hybrid's layers added to step1's cfg as float_dtype, each commented with its pair."""
        from ..config import update_custom_layers

        for note in hybrid.notes:
            self._log("I", "hybrid_quantization_step1", note)
        comments = {n: f"custom_hybrid {why}" for n, why in hybrid.layers.items()}
        text = update_custom_layers(cfg.read_text(encoding="utf-8"), {n: self._cfg.float_dtype for n in hybrid.layers}, comments)
        write_atomic(cfg, text)
        self._log("I", "hybrid_quantization_step1", f"custom_hybrid {', '.join(hybrid.pairs)}: {len(hybrid.layers)} layers set to "
                                                    f"{self._cfg.float_dtype} in {cfg.name}.")

    def _proposal_kwargs(self, where: str, samples: int) -> dict[str, Any]:
        """`proposal=` for hybridq.step1 (target auto_hybrid_cos_thresh, fallback float_dtype), or a clear failure."""
        from .. import api

        options = getattr(api, "ProposalOptions", None)
        if options is None or "proposal" not in inspect.signature(api.step1).parameters:
            self._log("E", where, "automatic layer choice (proposal / auto_hybrid) is not available in this hybridq; run without it, "
                                  "then find the layers to keep in float with `hybridq analyze MODEL.onnx MODEL.quantization.cfg --dataset D` "
                                  "and list them in custom_quantize_layers.")
            raise _Failed
        from ..proposal import Target

        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise InputError(f"proposal_dataset_size must be a positive integer, got {samples!r}.")
        if self._cfg.euc_thresh is not None:
            self._once("euc_thresh", where, "auto_hybrid_euc_thresh has no hybridq equivalent (Euclidean distance depends on the tensor's scale); "
                                            "only auto_hybrid_cos_thresh is used as the target.")
        return {"proposal": options(target=Target(cosine=self._cfg.cos_thresh, snr_db=None), fallback=self._cfg.float_dtype, samples=samples)}

    @_rknn_method()
    def hybrid_quantization_step2(self, model_input: str, data_input: str, model_quantization_cfg: str) -> int:
        """Build the deployable model from the three step1 artifacts (the cfg as edited).

        `model_quantization_cfg` may also be a cfg RKNN-Toolkit2's own step1 wrote (for the same ONNX model):
        its float layers and edited ranges are carried into a private copy of the hybridq cfg beside
        `model_input` (hybridq.rknn.cfg.import_rknn_cfg), and the names that do not map are logged."""
        from .. import api

        with self._staging("built") as out:
            cfg = self._hybridq_cfg(model_input, Path(model_quantization_cfg), out)
            res = api.step2(model_input, data_input, cfg, out / f"{Path(model_input).stem}.q.onnx")
        self._set_built(res.output, out, True)
        if self._float_path is None:
            self._float_path = Path(model_input).resolve()  # the temp model is plain fp32 ONNX
        self._emit("hybrid_quantization_step2", _report.step2_lines(res))
        return 0

    def _hybridq_cfg(self, model_input: str, given: Path, out: Path) -> Path:
        """`given`, or, when RKNN wrote it, a copy of the hybridq cfg beside `model_input` with RKNN's decisions imported."""
        from .cfg import hybridq_cfg_for

        cfg, res = hybridq_cfg_for(model_input, given, out)
        if res is not None:
            self._log("I", "hybrid_quantization_step2", f"RKNN cfg {given}: {len(res.layers)} float layer(s) and {len(res.ranges)} "
                      f"edited range(s) carried into a copy of {res.cfg.name}.")
            for note in res.notes:
                self._log("I", "hybrid_quantization_step2", f"note: {note}")
            for u in res.unmapped:
                self._log("W", "hybrid_quantization_step2", f"RKNN {u.section} '{u.name}' has no counterpart: {u.reason}.")
        return cfg

    # ------------------------------------------------------------------ build

    @_rknn_method()
    def build(self, do_quantization: bool = True, dataset: str | None = None, rknn_batch_size: int | None = None, auto_hybrid: bool = False) -> int:
        """step1 + step2 in a private directory (nothing is written beside the model or in the current directory)."""
        from .. import api

        model = self._need_model()
        if rknn_batch_size is not None:
            self._once("rknn_batch_size", "build", f"rknn_batch_size={rknn_batch_size!r} sets the NPU model's batch; ignored (the ONNX model keeps its own batch dim).")
        if not do_quantization:
            if auto_hybrid:
                self._log("W", "build", "auto_hybrid=True has no effect with do_quantization=False.")
            self._set_built(model, None, False)
            self._log("I", "build", "do_quantization=False: the built model is the fp32 ONNX model "
                                    "(RKNN would run it in float16 on the NPU; ONNX Runtime's CPU runs float32).")
            return 0
        if dataset is None:
            raise InputError("do_quantization=True needs a dataset: rknn.build(do_quantization=True, dataset='./dataset.txt') "
                             "(one image or .npy path per line, one path per model input).")
        kwargs = self._proposal_kwargs("build", 16) if auto_hybrid else {}
        pre = self._preprocess(self._n_inputs(model))
        here = Path.cwd()
        with self._staging("build") as work:
            r1 = api.step1(here / model, _absolute(dataset, here), out=work, settings=self._settings(), preprocess=pre, **kwargs)
            res = api.step2(r1.model, r1.data, r1.cfg, work / f"{model.stem}.q.onnx")
        self._set_built(res.output, work, True)
        self._log("I", "build", f"calibrated on {r1.samples} samples.")
        self._emit("build", _report.step1_lines(r1))
        self._emit("build", _report.step2_lines(res))
        return 0

    def _need_built(self) -> Path:
        if self._built is None:
            raise InputError("no model is built; call rknn.build(...) or rknn.hybrid_quantization_step2(...) first "
                             "(or rknn.load_rknn(path) for a model exported by hybridq).")
        return self._built

    # ------------------------------------------------------------------ export / load

    @_rknn_method()
    def export_rknn(self, export_path: str, **kwargs: Any) -> int:
        """Write the built model, an ONNX model (QDQ, or float when nothing was quantized) ONNX Runtime runs, not an RKNN file."""
        if kwargs:
            self._once("export_rknn:kwargs", "export_rknn", f"options {', '.join(kwargs)} are for RKNN files; ignored.")
        kind = _report.model_kind(self._need_built())
        self._export(Path(export_path))
        self._log("W", "export_rknn", f"{export_path} is {kind}, not an RKNN model: run it with ONNX Runtime, "
                                      "open it in Netron, or call rknn.export_onnx() to give it an .onnx name.")
        return 0

    @_rknn_method()
    def export_onnx(self, export_path: str) -> int:
        """Write the built (deployable QDQ) ONNX model."""
        self._export(Path(export_path))
        self._log("I", "export_onnx", f"wrote {export_path}.")
        return 0

    def _export(self, dest: Path) -> None:
        copy_atomic(self._need_built(), dest, parents=True)

    @_rknn_method()
    def load_rknn(self, path: str) -> int:
        """Load a model written by export_rknn / export_onnx (an ONNX file) for init_runtime / inference."""
        p = Path(path)
        try:
            load_model(p)
        except ModelError as exc:
            raise ModelError(f"{exc} hybridq's load_rknn reads the ONNX files its export_rknn writes; a real .rknn file runs only on a Rockchip NPU.") from None
        self._set_built(p.resolve(), None, True)
        return 0

    # ------------------------------------------------------------------ accuracy analysis

    @_rknn_method()
    def accuracy_analysis(self, inputs: list[str], output_dir: str | None = "./snapshot", target: str | None = None, device_id: str | None = None) -> int:
        """Per-layer error of the built model against fp32 on one sample (one path per model input).

        Writes into `output_dir` RKNN's folder (golden/ and simulator/, each NAME.txt and npy/NAME.npy per tensor
        in its own shape, map_name_to_file.txt, error_analysis.txt; hybridq.rknn._layout) and, beside it,
        hybridq's snapshot of the same analysis (fp32/, quant/, manifest.json, report), which `hybridq analyze
        --from` re-reads. `output_dir=None` writes nothing.
        """
        from .. import api
        from ..report import render_txt, verdict

        if target is not None or device_id is not None:
            self._once("accuracy_analysis:target", "accuracy_analysis", f"target={target!r} needs a Rockchip board; comparing fp32 with the built model in ONNX Runtime only.")
        built = self._need_built()
        if not self._built_quantized:
            raise InputError("the built model is not quantized (build(do_quantization=False)); there is nothing to analyse. "
                             "Build with do_quantization=True and a dataset.")
        float_path = self._float_path or built
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [str(inputs)]
        n = self._n_inputs(float_path)
        if len(inputs) != n:
            raise InputError(f"accuracy_analysis got {len(inputs)} input path(s) but the model has {n} input(s); give one image or .npy path per input, in input order.")
        listing = self._tmp / "analysis" / "dataset.txt"
        listing.parent.mkdir(exist_ok=True)
        names = []
        for i, src in enumerate(inputs):
            p = Path(src)
            if not p.is_file():
                raise InputError(f"accuracy_analysis input {str(src)!r} does not exist; give the path of an image (.jpg .png .bmp) or .npy file.")
            link = listing.parent / f"input{i}{p.suffix.lower()}"
            link.unlink(missing_ok=True)
            try:
                link.symlink_to(p.resolve())
            except OSError:
                shutil.copyfile(p, link)
            names.append(link.name)
        listing.write_text(" ".join(names) + "\n", encoding="utf-8")
        out = Path(output_dir) if output_dir is not None else self._tmp / "snapshot"
        result = api.analyze(float_path, built, listing, preprocess=self._analysis_preprocess(n), dump=out)
        if output_dir is not None:
            _layout.write_rknn_folder(out, result)
        print(render_txt(result), flush=True)  # RKNN prints the table too
        self._log("I", "accuracy_analysis", verdict(result))
        if output_dir is not None:
            self._log("I", "accuracy_analysis", f"the error analysis results save to: {out / 'error_analysis.txt'}")
        return 0

    def _analysis_preprocess(self, n_inputs: int):
        """The recorded preprocessing of the built model; config()'s mean/std/color must agree with it (hybridq.recorded)."""
        from ..recorded import Record, choose_preprocess

        if not self._built_pre:
            return self._preprocess(n_inputs)
        given = None
        if self._cfg.mean_values is not None or self._cfg.std_values is not None:
            given = {k: v for k, v in self._preprocess(n_inputs).to_dict().items() if k in ("mean", "std", "color")}
        return choose_preprocess(Record(f"the built model '{self._built}'", self._built_pre), given)

    # ------------------------------------------------------------------ runtime

    @_rknn_method()
    def init_runtime(self, target: str | None = None, device_id: str | None = None, perf_debug: bool = False, eval_mem: bool = False,
                     async_mode: bool = False, core_mask: int = NPU_CORE_AUTO, fallback_prior_device: str = "cpu") -> int:
        """An ONNX Runtime CPU session on the built model (the 'simulator')."""
        import onnxruntime as ort

        if target is not None or device_id is not None:
            self._once("init_runtime:target", "init_runtime", f"target={target!r}: there is no Rockchip NPU here; running the built ONNX model in ONNX Runtime's CPU provider.")
        built = self._need_built()
        try:
            # the simulator computes int8 products exactly, as the NPU does (hybridq.kernels)
            self._session = _runtime.session(built, exact_int8=True)
        except Exception as exc:
            raise ModelError(f"ONNX Runtime cannot load the built model '{built}': {str(exc).splitlines()[0]}") from None
        self._log("I", "init_runtime", f"ONNX Runtime {ort.__version__} CPU session on {built.name}.")
        return 0

    @_rknn_method(fail=None)
    def inference(self, inputs: list[np.ndarray], data_format: str | list[str] | None = None, inputs_pass_through: list[int] | None = None,
                  get_frame_id: bool = False) -> list[np.ndarray] | None:
        """Run the built model: 4-D inputs are raw images (NHWC unless data_format says 'nchw'), normalised with mean/std."""
        if self._session is None:
            raise InputError("the runtime is not initialised; call rknn.init_runtime() after build / hybrid_quantization_step2.")
        if get_frame_id:
            self._once("get_frame_id", "inference", "get_frame_id is for camera demos on a board; ignored.")
        metas = self._session.get_inputs()
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        if len(inputs) != len(metas):
            raise InputError(f"inference got {len(inputs)} input(s) but the model has {len(metas)} ({', '.join(m.name for m in metas)}); pass one array per input in that order.")
        formats = data_format if isinstance(data_format, (list, tuple)) else [data_format] * len(metas)
        passes = inputs_pass_through or [0] * len(metas)
        mean = self._runtime_values("mean", len(metas))
        std = self._runtime_values("std", len(metas))
        feed = {}
        for k, (meta, arr) in enumerate(zip(metas, inputs)):
            feed[meta.name] = normalize_input(np.asarray(arr), meta, formats[k] or "nhwc", None if passes[k] else mean[k], None if passes[k] else std[k])
        return list(self._session.run(None, feed))

    def _runtime_values(self, which: str, n: int) -> list[tuple[float, ...] | None]:
        vals = self._cfg.mean_values if which == "mean" else self._cfg.std_values
        if vals is None and self._built_pre.get(which) is not None:
            vals = [tuple(self._built_pre[which])]
        if vals is None:
            return [None] * n
        if len(vals) == 1:
            return list(vals) * n
        if len(vals) != n:
            raise InputError(f"{which}_values has {len(vals)} lists but the model has {n} inputs; give one list per input.")
        return list(vals)

    @_rknn_method(fail=None)
    def get_sdk_version(self) -> str:
        """hybridq and ONNX Runtime versions (there is no NPU SDK)."""
        import onnxruntime as ort

        return f"hybridq {__version__} (ONNX Runtime {ort.__version__}, CPU)"

    def release(self) -> None:
        """Drop the session and delete the private working directory."""
        self._session = None
        self._cleanup()


def _recorded_pre(model: Path) -> dict[str, Any]:
    """The preprocessing step1 recorded, as step2 wrote it into the model's metadata ({} when none)."""
    from ..recorded import read_record

    return dict(read_record(model).preprocess or {})
