package coord

// UnescapeForTest exposes unescape to the external tests.
var UnescapeForTest = unescape
