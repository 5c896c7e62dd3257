"""The conversion job: measure -> optimize -> quantize -> compile, resumable after every module.

State lives in the work directory: job_new.json (settings, progress, measurement, chosen layout),
measurement.json, state/ (calibration tokens and the hidden states entering the next module, one file
per stage and module index) and out_tensor/ (one safetensors file per quantized module). Progress runs
through: begin, measure, optimize, quant, compile, finished.

Every file is written whole or not at all (files.py), and a module's hidden states are written before
the job file says the module is done, under a name that includes the module index, so a job killed at
any point resumes from its job file and produces the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from ..config import ExLlamaV2Config
from ..errors import ConversionError  # noqa: F401  (re-exported: callers import it from here)
from ..model.linear import ExLlamaV2Linear
from ..model.model import ExLlamaV2
from ..model.module import ExLlamaV2Module
from ..quant import is_quantized_tensor
from ..tokenizer import ExLlamaV2Tokenizer
from . import calibration, files
from .compile import compile_model
from .layers import forward_rows, is_layer, linears_of, module_name, options_for, record_hessians, role
from .measure import attach, detach, measure_module, prepare_all, quantize_module_linear, relative_error
from .optimize import choose
from .qparams import HEAD_OPTIONS, QParams
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
        if is_quantized_tensor(name):
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
        files.write_text(self.work_dir / JOB_FILE, json.dumps(self.job, indent=2))

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
        files.save_tensors(tokens, self.state_dir / "tokens.safetensors")
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
                job["measurement"][module_name(m)], states = measure_module(m, states, self.device, options_for(m))
            else:
                states = forward_rows(m, states, self.device)
            m.unload()
            self._checkpoint(states, "measure_idx", i + 1)
        result = {"measurement": job["measurement"], "last_module_idx": last}
        text = json.dumps(result, indent=2)
        files.write_text(self.work_dir / "measurement.json", text)
        if job.get("output_measurement"):
            files.write_text(Path(job["output_measurement"]), text)
            log.info("measurement saved to %s; stopping (-om)", job["output_measurement"])
            job["progress"] = "finished"
        else:
            job["progress"] = "optimize"

    def optimize(self) -> None:
        numel = {module_name(m): sum(lin.in_features * lin.out_features for lin in linears_of(m))
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

    def _states_file(self, which: str, index: int) -> Path:
        """The hidden states entering module `index` in stage `which` (measure or quant)."""
        return self.state_dir / f"{which}_states_{index:05d}.safetensors"

    def _states(self, which: str, start: int) -> torch.Tensor:
        if start == 0:
            return load_file(str(self.state_dir / "tokens.safetensors"))[which]
        path = self._states_file(which, start)
        legacy = self.state_dir / "hidden_states.safetensors"     # work directories of earlier versions
        if not path.exists() and legacy.exists():
            path = legacy
        if not path.exists():
            raise ConversionError(
                f"the job in {self.work_dir} resumes {which} at module {start}, but its hidden states "
                f"({path.name}) are missing; the work directory is damaged: run again with -nr to start over"
            )
        return load_file(str(path))["states"]

    def _checkpoint(self, states: torch.Tensor, counter: str, value: int) -> None:
        """States first, then the job file: killed in between, the job resumes at the previous module,
        whose input states are still on disk (older files are removed only after the job is saved)."""
        which = counter.removesuffix("_idx")
        current = self._states_file(which, value)
        files.save_tensors({"states": states.contiguous()}, current)
        self.job[counter] = value
        self.save()
        for old in self.state_dir.glob("*_states_*.safetensors"):
            if old != current:
                old.unlink(missing_ok=True)

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
        files.save_tensors(tensors, self.tensor_dir / f"{module_name(m)}.safetensors")
        if ref is None:
            detach(m)
            return states
        out = forward_rows(m, states, self.device)
        detach(m)
        err = relative_error(out, ref)
        self.job["quant_errors"][module_name(m)] = err
        log.info("%s: relative error %.5f", module_name(m), err)
        return out
