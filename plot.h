/* plot.h: the training-loss chart that ./train writes as loss.png: axes with
 * ticks and numbers, the raw loss faint and the smoothed loss bold, the
 * learning rate in a panel of its own when it is scheduled, and a title. */
#ifndef SDLORA_PLOT_H
#define SDLORA_PLOT_H

#include <stdint.h>

typedef struct {
    const float *raw;        /* loss at steps 1..n, or NULL */
    const float *smooth;     /* smoothed loss at steps 1..n */
    const float *lr;         /* learning rate at steps 1..n, or NULL (drawn only when it changes) */
    long n;
    const char *title;       /* first line, large */
    const char *subtitle;    /* second line, or NULL */
    int log_y;               /* 1 log, 0 linear, -1: log when the loss spans a decade or more */
} plot_series;

/* where the loss panel is and what it maps: pixel (x0..x1, y0..y1) holds
 * steps 1..n across and [lo, hi] up (log10 of them when log_y) */
typedef struct {
    int x0, y0, x1, y1;
    double lo, hi;
    int log_y;
    long n;
} plot_frame;

/* draw the chart on a white RGB image w x h (at least 320 x 200).
 * frame, when not NULL, receives the loss panel's mapping. Returns 0, or -1
 * when there is nothing to draw (n < 1) or the image is too small. */
int plot_loss(uint8_t *rgb, int w, int h, const plot_series *s, plot_frame *frame);
/* the pixel column of a step and the pixel row of a loss value */
int plot_x(const plot_frame *f, double step);
int plot_y(const plot_frame *f, double value);
/* tick values for [lo, hi]: multiples of 1, 2 or 5 times a power of ten,
 * about `want` of them; returns how many (at most max) went into ticks */
int plot_ticks(double lo, double hi, int want, double *ticks, int max);

#endif
