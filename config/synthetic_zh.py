# The embedded default in Chinese: the same tiny HMMC and schedule as config/synthetic.py, with the Chinese
# captions and a 2-layer BERT trained from scratch as the text tower.
# $ python train.py config/synthetic_zh.py
out_dir = "out-synthetic-zh"
caption_field = "captions_zh"
text_encoder = "bert"  # the tokenizer is the dataset's vocab.txt (one token per character)
# A caption takes a token per character: the longest needs 23 with [CLS] and [SEP] (16 would cut 4,254 of 6,000)
context_length = 24
eval_context_length = 24
# The mean of the token states, not the [CLS] pooler: at BERT's initialisation the layers barely move the [CLS]
# embedding, so every caption starts with the same embedding and the loss sits at chance for hundreds of steps
bert_pooling = "mean"
bert_dropout = 0.0  # as the CLIP text tower of the English run: on 6,000 captions dropout only slows learning
text_lr = 1e-3  # the BERT with mean pooling learns at the video towers' rate (the README's first table)
