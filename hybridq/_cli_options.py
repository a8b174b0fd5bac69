"""The option types the `hybridq` commands share (typer annotations: the flag, its help, its bounds)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

MeanOpt = Annotated[Optional[str], typer.Option(help="Per-channel mean in 0-255 pixel units, e.g. 123.675,116.28,103.53 (RKNN mean_values).")]
StdOpt = Annotated[Optional[str], typer.Option(help="Per-channel std in 0-255 pixel units, e.g. 58.395,57.12,57.375.")]
ColorOpt = Annotated[Optional[str], typer.Option(help="Channel order fed to the model: rgb (default) or bgr.")]
LayoutOpt = Annotated[Optional[str], typer.Option(help="nchw or nhwc; inferred from the model when omitted.")]
ResizeOpt = Annotated[Optional[str], typer.Option(help="none (default: size mismatch is an error), stretch or letterbox.")]
ForceOpt = Annotated[bool, typer.Option("--force-preprocess", help="Use the preprocessing options given even where they "
                                         "contradict the ones step1 recorded (default: read them from the cfg or model; a contradiction is an error).")]
HookOpt = Annotated[Optional[str], typer.Option("--preprocess", help="module.py:function(path, spec) -> array, replacing image loading.")]
TargetCosOpt = Annotated[Optional[float], typer.Option(help="Proposal target: cosine on every output and slice. Default: 0.99 with --target-snr 20, as analyze's verdict; a target given replaces that pair (give both for both).")]
TargetSnrOpt = Annotated[Optional[float], typer.Option(help="Proposal target: SNR in dB of every output's worst slice (instead of or with --target-cosine).")]
MaxLayersOpt = Annotated[Optional[int], typer.Option(min=0, help="Proposal budget: at most K float layers.")]
NoMeasureOpt = Annotated[Optional[bool], typer.Option("--measure/--no-measure", help="Time each layer on this CPU and keep float where int8 is not faster (cost_model: measured), or place by MAC counts (macs, the default).")]
MaxSlowOpt = Annotated[Optional[float], typer.Option(help="Proposal budget: the float layers may slow the model's predicted latency "
                                                    "(step1's measured cost model) by at most this factor, e.g. 1.1; default no limit.")]
MaxFracOpt = Annotated[Optional[float], typer.Option(help="Proposal budget: the fraction of the Conv/Gemm/MatMul compute the proposal may move to float (default 0.05; 1 for no limit); on --target npu, of the quantized layers (an NPU pays per float16 layer, not per MAC).")]
EvalOpt = Annotated[Optional[str], typer.Option("--eval", help="module.py:function(model_path) -> score (higher is better) for the proposal target.")]
MaxDropOpt = Annotated[Optional[float], typer.Option(help="With --eval: largest allowed drop of the score below fp32 [default: 0.01].")]
FallbackOpt = Annotated[Optional[str], typer.Option(help="Precision of proposed layers: float32 (fastest on CPU), float16 or "
                                                            "int16 (npu only). Default: the target's, float32 on cpu, float16 on npu.")]
MaxSizeOpt = Annotated[Optional[float], typer.Option(help="Proposal budget: model size in MB (10^6 bytes), met first with int4 weights for the least sensitive MatMul/Gemm layers.")]
PropSamplesOpt = Annotated[int, typer.Option(help="Samples the proposal measures candidates on.")]
FixInputOpt = Annotated[Optional[list[str]], typer.Option("--fix-input", help="NAME=VALUE: make an input a constant (repeatable); "
                                                          "If nodes it decides fold into their taken branch, e.g. --fix-input sample_rate=16000.")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="Run the samples on N local worker processes (0: in this process); "
                                         "with --ray, the Ray workers. The figures are the same bit for bit.")]
RayOpt = Annotated[Optional[str], typer.Option("--ray", help="Run the samples on Ray (pip install 'hybridq[ray]'): auto (the running "
                                               "cluster), local (started and stopped here) or an address such as ray://head:10001.")]
