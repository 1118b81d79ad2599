package server

import (
	"encoding/json"
	"net/http"
)

// Result is PowerJob's ResultDTO, the envelope of every answer: workers
// written for PowerJob read success, data and message.
type Result struct {
	Success bool   `json:"success"`
	Data    any    `json:"data"`
	Message string `json:"message,omitempty"`
}

// writeResult writes r as JSON with status.
func writeResult(w http.ResponseWriter, status int, r Result) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(r)
}

func ok(w http.ResponseWriter, data any) {
	writeResult(w, http.StatusOK, Result{Success: true, Data: data})
}

// failed answers a domain error the PowerJob way: HTTP 200 with
// success:false, so that a worker moves on to its next server.
func failed(w http.ResponseWriter, msg string) {
	writeResult(w, http.StatusOK, Result{Success: false, Message: msg})
}

// badRequest answers malformed input: 400 with the same envelope.
func badRequest(w http.ResponseWriter, msg string) {
	writeResult(w, http.StatusBadRequest, Result{Success: false, Message: msg})
}
