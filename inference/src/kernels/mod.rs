//! CPU kernels of our own where candle has no fast path: today the Q4_1
//! weight × Q8_1 activation product, the format of the default model.
//! Each kernel has a scalar version (the reference, and the fallback) and an
//! AVX2 version chosen at run time; tests hold them to each other and to
//! candle's dequantised product.

pub mod q4_1;
