"""Error classes of the retrieval index."""


class RetrievalIndexError(ValueError):
    """Base class of index errors; the message says what is wrong and what to do."""


class IndexNotFoundError(RetrievalIndexError):
    pass


class IndexCorruptError(RetrievalIndexError):
    pass


class IndexVersionError(RetrievalIndexError):
    pass


class ModelMismatchError(RetrievalIndexError):
    pass


class DimensionMismatchError(ModelMismatchError):
    pass
