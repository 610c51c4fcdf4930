"""A teacher that is not a transformers model: a small GRU language model, for the torch-module backend's tests."""

import torch


class GRULM(torch.nn.Module):
    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.num_layers, self.hidden_size, self.vocab_size = 1, width, vocab
        self.embed = torch.nn.Embedding(vocab, width)
        self.rnn = torch.nn.GRU(width, width, batch_first=True)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask):
        e = self.embed(input_ids)
        h, _ = self.rnn(e)
        return {"logits": self.head(h), "hidden_states": (e, h)}


def build(vocab: int = 100, width: int = 16) -> GRULM:
    return GRULM(vocab, width)
