// The soft mask's cut, shared by the CPU and CUDA kernels (sparseops.reference.SIGMOID_OFF_BELOW is
// the Python side and says why): sigmoid(z) and its derivative are exactly 0 where z < -63 ln 2,
// i.e. where sigmoid(z) < 2^-63.
#pragma once

namespace sparseops {
constexpr double kSigmoidOffBelow = -43.66827237527655;
}  // namespace sparseops
