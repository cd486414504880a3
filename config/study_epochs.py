# After config/study_synthetic.py: why the built-in run trains 9 epochs. The same runs at the 6 epochs (1,122 steps)
# the default once had, in English and in Chinese, at the first table's seeds; its 9-epoch runs are reused.
# $ python study.py config/study_synthetic.py config/study_epochs.py
out_dir = "out-study-synthetic"
name = "epochs"
rows = {
    "english": "",
    "english 6 epochs": "--epochs=6",
    "chinese": "config/synthetic_zh.py",
    "chinese 6 epochs": "config/synthetic_zh.py --epochs=6",
}
seeds = (1337, 3, 4, 5, 6)
