"""The conversion job: measure -> optimize -> quantize -> compile, resumable after every module.

State lives in the work directory: job_new.json (settings, progress, measurement, chosen layout),
measurement.json, state/ (calibration tokens and the current hidden states) and out_tensor/ (one
safetensors file per quantized module). Progress runs through: begin, measure, optimize, quant,
compile, finished.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..attn.layer import ExLlamaV2Attention
from ..config import ExLlamaV2Config
from ..errors import ConversionError  # noqa: F401  (re-exported: callers import it from here)
from ..linear import ExLlamaV2Linear
from ..model import ExLlamaV2
from ..module import ExLlamaV2Module
from ..tokenizer import ExLlamaV2Tokenizer
from . import calibration
from .compile import compile_model
from .layers import forward_rows, is_layer, linears_of, module_name, record_hessians, role
from .measure import attach, detach, measure_module, prepare_all, quantize_module_linear, relative_error
from .optimize import choose
from .qparams import ATTN_OPTIONS, HEAD_OPTIONS, QParams, mlp_options
from .quantizer import Hessian

log = logging.getLogger(__name__)

JOB_FILE = "job_new.json"


# job setup ------------------------------------------------------------------------------------


def new_job(**settings) -> dict:
    job = dict(settings)
    job["cal_dataset_name"] = Path(job["cal_dataset"]).name if job.get("cal_dataset") else calibration.BUILTIN_NAME
    job["progress"] = "begin"
    if job.get("measurement_file"):
        data = json.loads(Path(job["measurement_file"]).read_text(encoding="utf-8"))
        if "measurement" not in data:
            raise ConversionError(f"{job['measurement_file']}: not a measurement.json (no 'measurement' key)")
        job["measurement"] = data["measurement"]
        job["last_module_idx"] = data.get("last_module_idx")
    return job


def open_job(work_dir: Path, settings: dict, resume: bool, no_resume: bool) -> dict:
    """The job to run in work_dir: the saved one (resuming), or a new one from settings."""
    job_file = work_dir / JOB_FILE
    if work_dir.exists() and not work_dir.is_dir():
        raise ConversionError(f"work directory {work_dir} exists and is not a directory")
    if no_resume and job_file.exists():
        log.info("-nr: clearing the previous job in %s", work_dir)
        shutil.rmtree(work_dir)
    if job_file.exists():
        job = json.loads(job_file.read_text(encoding="utf-8"))
        if job.get("progress") == "finished":
            raise ConversionError(f"the job in {work_dir} has already finished; pass -nr to start it over")
        log.info("resuming the job in %s at stage %r", work_dir, job["progress"])
        return job
    if resume:
        raise ConversionError(f"-res: no job to resume in {work_dir} (no {JOB_FILE})")
    if work_dir.exists() and any(work_dir.iterdir()):
        raise ConversionError(
            f"work directory {work_dir} is not empty and holds no job to resume; choose an empty or new "
            f"directory for -o"
        )
    if settings.get("in_dir") is None:
        raise ConversionError("no input model: pass -i <FP16 model directory>")
    full = settings.get("compile_full")
    if full and Path(full).exists() and (not Path(full).is_dir() or any(Path(full).iterdir())):
        raise ConversionError(f"output directory {full} (-cf) is not empty; choose an empty or new directory")
    work_dir.mkdir(parents=True, exist_ok=True)
    return new_job(**settings)


def check_input(config: ExLlamaV2Config) -> None:
    """Refuse anything but an unquantized FP16/BF16/FP32 checkpoint."""
    if config.quantization_config:
        method = config.quantization_config.get("quant_method", "unknown")
        raise ConversionError(
            f"{config.model_dir} is already quantized ({method} quantization_config in config.json); "
            f"convert from the original FP16 model"
        )
    index = config.index
    for name in index.keys():
        if name.endswith((".q_weight", ".qweight", ".qzeros")):
            raise ConversionError(f"{config.model_dir} holds quantized tensors ({name}); convert from the FP16 model")
        if name.endswith(".weight") and not index.dtype(name).is_floating_point:
            raise ConversionError(
                f"{config.model_dir}: {name} is {index.dtype(name)}, not a floating point weight; the input "
                f"must be an FP16 (or BF16/FP32) model"
            )


# the converter ------------------------------------------------------------------------------------


class Converter:
    def __init__(self, job: dict, work_dir: Path) -> None:
        self.job = job
        self.work_dir = work_dir
        self.state_dir = work_dir / "state"
        self.tensor_dir = work_dir / "out_tensor"
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        config = ExLlamaV2Config(job["in_dir"])
        if job.get("rope_scale"):
            config.scale_pos_emb = job["rope_scale"]
        if job.get("rope_alpha"):
            config.scale_alpha_value = job["rope_alpha"]
        check_input(config)
        self.config = config
        self.model = ExLlamaV2(config)
        self.state_dir.mkdir(exist_ok=True)
        self.tensor_dir.mkdir(exist_ok=True)
        self.save()

    def save(self) -> None:
        path = self.work_dir / JOB_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.job, indent=2), encoding="utf-8")
        tmp.replace(path)

    def run(self) -> None:
        stages = {"begin": self.tokenize, "measure": self.measure, "optimize": self.optimize,
                  "quant": self.quantize, "compile": self.compile}
        with torch.inference_mode():
            while self.job["progress"] != "finished":
                stages[self.job["progress"]]()
                self.save()

    # stages ---------------------------------------------------------------------------------

    def tokenize(self) -> None:
        job = self.job
        tokenizer = ExLlamaV2Tokenizer(self.config)
        docs = calibration.read_documents(job.get("cal_dataset"))
        tokens = {"quant": calibration.token_rows(tokenizer, docs, job["dataset_rows"], job["length"])}
        if "measurement" not in job:
            tokens["measure"] = calibration.token_rows(tokenizer, docs, job["measurement_rows"], job["measurement_length"])
        vocab = self.config.vocab_size
        for name, t in tokens.items():
            if int(t.max()) >= vocab:
                raise ConversionError(
                    f"the tokenizer produced id {int(t.max())} but the model's vocabulary has {vocab} entries; "
                    f"the tokenizer files do not belong to this model"
                )
        save_file(tokens, str(self.state_dir / "tokens.safetensors"))
        if "measurement" in job:
            log.info("reusing measurement from %s", job.get("measurement_file"))
            job["progress"] = "optimize"
        else:
            job["progress"] = "measure"
            job["measurement"] = {}
            job["measure_idx"] = 0

    def measure(self) -> None:
        job, modules = self.job, self.model.modules
        last = max(i for i, m in enumerate(modules) if is_layer(m))
        start = job["measure_idx"]
        states = self._states("measure", start)
        for i in tqdm(range(start, last + 1), desc="Measuring", unit="module", initial=start, total=last + 1):
            m = self._load(modules[i])
            if is_layer(m):
                options = ATTN_OPTIONS if isinstance(m, ExLlamaV2Attention) else mlp_options(m.gate_proj is not None)
                job["measurement"][module_name(m)], states = measure_module(m, states, self.device, options)
            else:
                states = forward_rows(m, states, self.device)
            m.unload()
            self._checkpoint(states, "measure_idx", i + 1)
        result = {"measurement": job["measurement"], "last_module_idx": last}
        text = json.dumps(result, indent=2)
        (self.work_dir / "measurement.json").write_text(text, encoding="utf-8")
        if job.get("output_measurement"):
            Path(job["output_measurement"]).write_text(text, encoding="utf-8")
            log.info("measurement saved to %s; stopping (-om)", job["output_measurement"])
            job["progress"] = "finished"
        else:
            job["progress"] = "optimize"

    def optimize(self) -> None:
        numel = {module_name(m): sum(l.in_features * l.out_features for l in linears_of(m))
                 for m in self.model.modules if is_layer(m)}
        self.job["strategy"] = choose(self.job["measurement"], numel, self.job["bits"])
        self.job["progress"] = "quant"
        self.job["quant_idx"] = 0
        self.job["quant_errors"] = {}

    def quantize(self) -> None:
        job, modules = self.job, self.model.modules
        start = job["quant_idx"]
        states = self._states("quant", start)
        for i in tqdm(range(start, len(modules)), desc="Quantizing", unit="module", initial=start, total=len(modules)):
            m = self._load(modules[i])
            if is_layer(m) or isinstance(m, ExLlamaV2Linear):
                states = self._quantize_module(m, states)
            else:
                states = forward_rows(m, states, self.device)
            m.unload()
            self._checkpoint(states, "quant_idx", i + 1)
        job["progress"] = "compile"

    def compile(self) -> None:
        out_dir = Path(self.job.get("compile_full") or self.work_dir)
        compile_model(self.job, self.model, self.tensor_dir, out_dir)
        self.job["progress"] = "finished"

    # helpers --------------------------------------------------------------------------------

    def _load(self, m: ExLlamaV2Module) -> ExLlamaV2Module:
        m.set_device(torch.device("cpu") if m is self.model.modules[0] else self.device)
        m.load()
        return m

    def _states(self, which: str, start: int) -> torch.Tensor:
        if start == 0:
            return load_file(str(self.state_dir / "tokens.safetensors"))[which]
        return load_file(str(self.state_dir / "hidden_states.safetensors"))["states"]

    def _checkpoint(self, states: torch.Tensor, counter: str, value: int) -> None:
        save_file({"states": states.contiguous()}, str(self.state_dir / "hidden_states.safetensors"))
        self.job[counter] = value
        self.save()

    def _quantize_module(self, m: ExLlamaV2Module, states: torch.Tensor) -> torch.Tensor:
        """Quantize a layer (with its chosen candidate) or the head (with -hb), save its tensors,
        and return its output with the quantized weights: the next module's input."""
        if isinstance(m, ExLlamaV2Linear):                  # the head: its input is the states
            h = Hessian(m.in_features, self.device)
            for row in states:
                h.add(row.to(self.device))
            hessians = {role(m): h}
            params = {role(m): HEAD_OPTIONS[self.job["head_bits"]]}
            ref = None
        else:
            with record_hessians(m, self.device) as hessians:
                ref = forward_rows(m, states, self.device)
            chosen = self.job["strategy"][module_name(m)]
            params = {role(lin): QParams.from_dict(chosen[role(lin)]) for lin in linears_of(m)}
        prepared = prepare_all(hessians)
        tensors = {}
        for lin in linears_of(m):
            ql = quantize_module_linear(lin, prepared[role(lin)], params[role(lin)])
            attach(lin, ql, self.device)
            tensors.update({f"{lin.key}.{name}": t for name, t in ql.tensors.items()})
        save_file(tensors, str(self.tensor_dir / f"{module_name(m)}.safetensors"))
        if ref is None:
            detach(m)
            return states
        out = forward_rows(m, states, self.device)
        detach(m)
        err = relative_error(out, ref)
        self.job["quant_errors"][module_name(m)] = err
        log.info("%s: relative error %.5f", module_name(m), err)
        return out
