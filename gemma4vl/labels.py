"""The label value of positions that carry no loss: the one constant the data pipeline and the model share.

The data pipeline writes it (:mod:`gemma4vl.data.collate`: every position but an assistant answer's next token);
the model skips it in the loss (:mod:`gemma4vl.models.language_model`). It lives in this module, which imports
nothing, because neither owner can import the other: ``gemma4vl.models`` imports Megatron-Core, which the data
package must not need, and the model must not depend on the data package (imports flow
recipes -> config / training / export -> bridge -> models; ``data`` is a leaf that knows nothing of Megatron).
"""

IGNORE_INDEX = -100
"""Label of a position without loss (also the default ``ignore_index`` of ``torch.nn.functional.cross_entropy``)."""
