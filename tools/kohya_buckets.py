"""Expected values for tests/test_bucket.c, from kohya sd-scripts' documented
bucketing algorithm, written again here in plain Python (no sdlora code):

  make_bucket_resolutions (library/model_util.py): the square
      floor(sqrt(A) / step) * step, and for each width w = min_size ..
      max_size in steps, h = min(max_size, floor(floor(A / w) / step) * step),
      kept when h >= min_size, both (w, h) and (h, w); a set, sorted.
  BucketManager.select_bucket (library/train_util.py, no_upscale off): the
      image's own size when it is a bucket, else the bucket of least
      |w/h - aspect| (numpy argmin: the first on a tie); scale so the image
      covers the bucket (match heights when the image is wider), resized
      size int(side * scale + 0.5).

Run: python3 tools/kohya_buckets.py  (prints the C tables pasted into the test)
"""
import math


def make_bucket_resolutions(max_reso, min_size, max_size, divisible):
    max_width, max_height = max_reso
    max_area = max_width * max_height
    resos = set()
    width = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((width, width))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def select_bucket(resos, image_width, image_height):
    aspect_ratio = image_width / image_height
    reso = (image_width, image_height)
    if reso not in set(resos):
        errors = [abs(w / h - aspect_ratio) for w, h in resos]
        reso = resos[errors.index(min(errors))]       # first of the least, as argmin
    ar_reso = reso[0] / reso[1]
    if aspect_ratio > ar_reso:
        scale = reso[1] / image_height
    else:
        scale = reso[0] / image_width
    return reso, (int(image_width * scale + 0.5), int(image_height * scale + 0.5))


CONFIGS = [  # (res, min, max, step)
    (512, 256, 1024, 64),
    (768, 256, 1024, 64),
    (1024, 256, 1024, 64),
    (64, 32, 128, 16),
]
SIZES = [(512, 512), (640, 480), (480, 640), (1920, 1080), (1080, 1920), (4032, 3024), (3024, 4032),
         (6000, 4000), (1000, 1000), (584, 512), (300, 100), (100, 300), (2000, 500), (123, 457),
         (576, 448), (256, 1024), (50, 50), (7, 3), (3000, 1000), (1280, 720), (720, 1280), (70, 64), (800, 700), (400, 300)]

if __name__ == "__main__":
    for res, mn, mx, st in CONFIGS:
        r = make_bucket_resolutions((res, res), mn, mx, st)
        print(f"/* res {res}, min {mn}, max {mx}, step {st}: {len(r)} buckets */")
        print("{" + ", ".join(f"{{{w}, {h}}}" for w, h in r) + "}")
    print("/* res, min, max, step, image w, h -> bucket w, h, resized w, h */")
    for res, mn, mx, st in CONFIGS:
        r = make_bucket_resolutions((res, res), mn, mx, st)
        for iw, ih in SIZES:
            (bw, bh), (rw, rh) = select_bucket(r, iw, ih)
            print(f"    {{{res}, {mn}, {mx}, {st}, {iw}, {ih}, {bw}, {bh}, {rw}, {rh}}},")
