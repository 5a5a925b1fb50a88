//! The participants' branch barrier as pure rules: each branch action runs at most once, a
//! reversal of what never ran is a null compensation, and a forward action after its reversal
//! is refused (hanging).
