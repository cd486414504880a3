# The README's first table: the built-in run over five seeds, in English and in Chinese, and without the temporal
# transformer (the frame-level floor: the task needs frame order).
# $ python study.py config/study_synthetic.py          (15 runs, two at a time)
# $ python study.py config/study_synthetic.py config/study_batch.py    (half and twice the batch, beside it)
out_dir = "out-study-synthetic"
rows = {
    "english": "",  # python train.py
    "frame-level": "--use_temp=False",
    "chinese": "config/synthetic_zh.py",
}
seeds = (1337, 3, 4, 5, 6)  # the default seed and four more (the 9 epochs were chosen at seeds 5 and 3)
