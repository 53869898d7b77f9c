#include "lowrank_operands.h"

#include <ATen/DimVector.h>

namespace lowrank_ext {

LowRankOperands prepare_lowrank_operands(
    const at::Tensor& x,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    bool keep_intermediate) {
  LowRankOperands ops;
  ops.k = x.size(-1);
  ops.r = A.size(0);
  ops.d = B.size(0);
  // DimVector: no heap allocation for the shapes, which matters at decode
  // sizes where the whole call takes a microsecond or two.
  at::DimVector y_shape(x.sizes().begin(), x.sizes().end() - 1);
  ops.M = c10::multiply_integers(y_shape.begin(), y_shape.end());
  at::DimVector t_shape = y_shape;
  y_shape.push_back(ops.d);
  t_shape.push_back(ops.r);
  ops.y = at::empty(y_shape, x.options());
  ops.t = keep_intermediate ? at::empty(t_shape, x.options()) : at::Tensor();

  ops.done = ops.M == 0 || ops.r == 0 || ops.k == 0;
  if (ops.done) {
    if (ops.M > 0) {
      if (ops.k == 0 && ops.r > 0) {
        // t = x·Aᵀ is zero, but t·Bᵀ is NaN in every output whose row of B
        // holds an Inf or a NaN (0·Inf), as the op's definition (and the
        // fallback, and lora_linear) give it.
        const at::Tensor t0 = at::zeros({ops.M, ops.r}, x.options());
        const at::Tensor y2 = bias.has_value()
            ? at::addmm(bias->expand({ops.M, ops.d}), t0, B.t())
            : at::mm(t0, B.t());
        ops.y.view({ops.M, ops.d}).copy_(y2);
      } else if (bias.has_value()) {
        // r = 0: the product is an empty sum; only the bias remains.
        ops.y.copy_(bias->expand_as(ops.y));
      } else {
        ops.y.zero_();
      }
      if (keep_intermediate) {
        ops.t.zero_();
      }
    }
    return ops;
  }
  // A 2-D x is used as it is: even a same-shape reshape creates a view.
  ops.x2 = x.dim() == 2 ? x : x.reshape({ops.M, ops.k});
  if (ops.x2.stride(1) != 1) {
    ops.x2 = ops.x2.contiguous();
  }
  ops.A2 = A.contiguous();
  ops.B2 = B.contiguous();
  ops.bias2 = bias.has_value() ? bias->contiguous() : at::Tensor();
  return ops;
}

} // namespace lowrank_ext
