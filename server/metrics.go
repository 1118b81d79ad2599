package server

import (
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/batonhq/baton/internal/metricset"
)

// httpMetrics are the node's HTTP metrics; a nil *httpMetrics records
// nothing.
type httpMetrics struct {
	requests *prometheus.CounterVec
	duration *prometheus.HistogramVec
	set      *metricset.Set
}

func newHTTPMetrics(reg prometheus.Registerer) (*httpMetrics, error) {
	if reg == nil {
		return nil, nil
	}
	m := &httpMetrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "baton", Subsystem: "http", Name: "requests_total",
			Help: "HTTP requests this node answered, by route (\"other\" for unknown paths) and status code.",
		}, []string{"path", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "baton", Subsystem: "http", Name: "request_seconds",
			Help:    "Time to answer an HTTP request, by route; an acquire may run an election.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 18),
		}, []string{"path"}),
	}
	set, err := metricset.Register(reg, m.requests, m.duration)
	if err != nil {
		return nil, fmt.Errorf("server: register HTTP metrics: %w", err)
	}
	m.set = set
	return m, nil
}

func (m *httpMetrics) unregister() {
	if m != nil {
		m.set.Unregister()
	}
}

// measured counts and times the requests next answers. The route is the
// ServeMux pattern that matched (set on the request as it is served), so
// that unknown paths do not grow the label set.
func (n *Node) measured(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		run := n.run.Load()
		if run == nil || run.metrics == nil {
			next.ServeHTTP(w, r)
			return
		}
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w, code: http.StatusOK}
		code := ""
		defer func() {
			if v := recover(); v != nil {
				code = "aborted" // the connection is dropped without an answer
				defer panic(v)
			}
			path := r.Pattern
			if path == "" || path == "/" {
				path = "other"
			}
			run.metrics.requests.WithLabelValues(path, code).Inc()
			run.metrics.duration.WithLabelValues(path).Observe(time.Since(start).Seconds())
		}()
		next.ServeHTTP(sw, r)
		code = strconv.Itoa(sw.code)
	})
}

// statusWriter remembers the status code written.
type statusWriter struct {
	http.ResponseWriter
	code        int
	wroteHeader bool
}

func (w *statusWriter) WriteHeader(code int) {
	if !w.wroteHeader {
		w.code, w.wroteHeader = code, true
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
