// The Python module exllamav2_ext: one entry per kernel wrapper. Kept to registrations only.
#include <torch/extension.h>

#include "ext_attn.h"
#include "ext_cache.h"
#include "ext_norm.h"
#include "ext_qmatrix.h"
#include "ext_rope.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.doc() = "exllamav2 CUDA kernels; each has a PyTorch twin in the exllamav2 package";

    m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"));
    m.def("layer_norm", &layer_norm, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"));

    m.def("rope_", &rope_, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("positions"), py::arg("neox"));

    // cache conversions share the token-window arguments (see ext_cache.h)
    const auto def_window_op = [](py::module_& mod, const char* name, auto fn, auto... leading) {
        mod.def(name, fn, leading..., py::arg("batch"), py::arg("offset"), py::arg("width"),
                py::arg("seqlens") = py::none(), py::arg("block_table") = py::none(), py::arg("page_size") = 0,
                py::arg("start_at_seqlen") = false, py::arg("end_at_seqlen") = false);
    };
    def_window_op(m, "fp16_to_fp8", &fp16_to_fp8, py::arg("src"), py::arg("dst"));
    def_window_op(m, "fp8_to_fp16", &fp8_to_fp16, py::arg("src"), py::arg("dst"));
    def_window_op(m, "fp16_to_q", &fp16_to_q, py::arg("src"), py::arg("q"), py::arg("scales"), py::arg("bits"));
    def_window_op(m, "q_to_fp16", &q_to_fp16, py::arg("q"), py::arg("scales"), py::arg("dst"), py::arg("bits"));

    m.attr("QFORMAT_EXL2") = QFORMAT_EXL2;
    m.attr("QFORMAT_GPTQ") = QFORMAT_GPTQ;
    py::class_<QMatrix>(m, "QMatrix")
        .def(py::init<int64_t, at::Tensor, at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>,
                      std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>, int64_t,
                      int64_t, int64_t, std::optional<at::Tensor>>(),
             py::arg("format"), py::arg("q_weight"), py::arg("chunks"), py::arg("perm"), py::arg("q_scale"),
             py::arg("scale_max"), py::arg("scales"), py::arg("qzeros"), py::arg("zero_offset"),
             py::arg("in_features"), py::arg("out_features"), py::arg("bias"))
        .def("forward", &QMatrix::forward, py::arg("x"), py::arg("max_fused_rows"), py::arg("max_dq_elements"))
        .def("reconstruct", &QMatrix::reconstruct, py::arg("out"), py::arg("col_start"));

    m.def("paged_attention", &paged_attention, py::arg("q"), py::arg("k_new"), py::arg("v_new"),
          py::arg("k_pages"), py::arg("v_pages"), py::arg("block_table"), py::arg("cache_seqlens"),
          py::arg("scale"), py::arg("window"), py::arg("softcap"));
}
