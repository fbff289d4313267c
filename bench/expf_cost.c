/* The cost of one scalar expf on this machine: the neuron field evaluates N of them per
 * position (bench/roofline.py counts them apart from FLOPs). Built by bench/run.py (yardstick)
 * with plain -O2 (no -ffast-math, so each call is glibc's scalar expf) and run once;
 * prints nanoseconds per call, the median of several passes, by CPU time.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define N 50000
#define PASSES 9

static double cpu_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(void) {
    static float arg[N];
    /* The field's arguments: -distance / temperature, roughly -40..0. */
    for (int i = 0; i < N; i++) arg[i] = -40.0f * (float)i / (float)N;
    double times[PASSES];
    volatile float sink = 0.0f;
    for (int p = 0; p < PASSES; p++) {
        double t0 = cpu_seconds();
        float acc = 0.0f;
        for (int i = 0; i < N; i++) acc += expf(arg[i]);
        times[p] = cpu_seconds() - t0;
        sink += acc;
    }
    qsort(times, PASSES, sizeof times[0], by_value);
    printf("%.4f\n", times[PASSES / 2] / N * 1e9);
    return sink < 0.0f;
}
