package server

import (
	"net/http"
	"path"
	"strconv"
)

// Request size limits. Every answer, refusals included, is the ResultDTO
// envelope: a worker or a peer never has to parse Go's plain-text errors.
const (
	// maxQueryBytes bounds a request's raw query: PowerJob's requests
	// carry a name, an id and an address.
	maxQueryBytes = 8 << 10
	// headerHardCap is what the standalone listener's Go server reads of
	// the headers before answering 431 itself, in plain text; up to it,
	// bounded (HTTPTimeouts.MaxHeaderBytes) answers the envelope.
	headerHardCap = 64 << 10
)

// bounded refuses, in the envelope, requests whose query or headers are
// over the limits, and paths that are not clean (ServeMux would answer
// them with a redirect in HTML). Bodies are never read: no route takes
// one.
func (n *Node) bounded(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if len(r.URL.RawQuery) > maxQueryBytes {
			writeResult(w, http.StatusRequestURITooLong, Result{Message: "query is over " + strconv.Itoa(maxQueryBytes) + " bytes"})
			return
		}
		if p := r.URL.Path; p == "" || path.Clean(p) != p && path.Clean(p)+"/" != p {
			// ServeMux would redirect, with an HTML body.
			writeResult(w, http.StatusNotFound, Result{Message: "no such endpoint: " + truncate(p)})
			return
		}
		if size := headerBytes(r); size > n.cfg.HTTPTimeouts.MaxHeaderBytes {
			writeResult(w, http.StatusRequestHeaderFieldsTooLarge, Result{Message: "headers are " + strconv.Itoa(size) + " bytes, over " + strconv.Itoa(n.cfg.HTTPTimeouts.MaxHeaderBytes)})
			return
		}
		next.ServeHTTP(w, r)
	})
}

// headerBytes is the size of r's request line and headers as sent,
// roughly ("Name: value\r\n" each).
func headerBytes(r *http.Request) int {
	size := len(r.Method) + len(r.RequestURI) + len(r.Proto) + 4 + len("Host: ") + len(r.Host) + 2
	for name, values := range r.Header {
		for _, v := range values {
			size += len(name) + len(v) + 4
		}
	}
	return size
}
