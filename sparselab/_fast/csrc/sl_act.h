/* The MLP activations by code (0 silu, 1 gelu_tanh, 2 relu), for every .pyx loop that
 * applies one (sparselab._fast._mlp, the shadow scorer of _predict). The constants are
 * doubles, as in the Cython these lines replaced, so results are unchanged. */
#ifndef SL_ACT_H
#define SL_ACT_H
#include <math.h>

static inline float sl_act(float v, int act) {
    if (act == 0) /* silu; for very negative v expf(-v) is +inf and the result is -0.0, not NaN */
        return (float)(v / (1.0 + expf(-v)));
    if (act == 1)
        return (float)(0.5 * v * (1.0 + tanhf((float)(0.7978845608028654 * (v + 0.044715 * v * v * v)))));
    return v > 0 ? v : 0.0f;
}

#endif
