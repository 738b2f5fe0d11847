"""Second-order numerics on symmetric operators: the dense Hessian (``dense``), block Lanczos
(``lanczos``), trace estimators (``trace``), spectral density (``density``), Hessian operators
(``operators``) and merging partial results (``merge``)."""
