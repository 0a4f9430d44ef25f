"""narthex.transactions: transactions, per-account aggregates, the simulator, training rows."""

from narthex.transactions.aggregates import (
    DEFAULTS,
    DESCRIPTIONS,
    FEATURES,
    RETENTION_SECONDS,
    AccountState,
    amount_zscore,
)
from narthex.transactions.events import (
    USD_RATES,
    Channel,
    InvalidTransaction,
    Transaction,
    transaction_errors,
)
from narthex.transactions.model_inputs import MODEL_FEATURE_NAMES, MODEL_FEATURES, model_input
from narthex.transactions.simulator import LabeledTransaction, simulate
from narthex.transactions.training import TrainingSet, training_set

__all__ = [
    "DEFAULTS",
    "DESCRIPTIONS",
    "FEATURES",
    "MODEL_FEATURES",
    "MODEL_FEATURE_NAMES",
    "RETENTION_SECONDS",
    "USD_RATES",
    "AccountState",
    "Channel",
    "InvalidTransaction",
    "LabeledTransaction",
    "TrainingSet",
    "Transaction",
    "amount_zscore",
    "model_input",
    "simulate",
    "training_set",
    "transaction_errors",
]
