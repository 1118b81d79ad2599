package server_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/batonhq/baton/internal/etcdcluster"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
)

// startNode starts a listening node on e with TTL 1 s; it is closed when
// the test ends unless the test closed it.
func startNode(t testing.TB, e *etcdcluster.Cluster, id string, edit ...func(*server.Config)) *server.Node {
	t.Helper()
	cfg := server.DefaultConfig()
	cfg.Client = testutil.Client(t, e)
	cfg.ServerID = id
	cfg.TTL = time.Second
	cfg.Listen = "127.0.0.1:0"
	cfg.Logger = testutil.Logger(t).Named(id)
	cfg.Election.PingTimeout = 300 * time.Millisecond
	for _, f := range edit {
		f(&cfg)
	}
	n, err := server.NewNode(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := n.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		n.Close(ctx)
	})
	return n
}

// worker is an HTTP client shaped like PowerJob's worker: plain GETs,
// ResultDTO parsed leniently into generic JSON.
type worker struct {
	t      testing.TB
	client *http.Client
}

func newWorker(t testing.TB) *worker {
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	return &worker{t: t, client: &http.Client{Transport: tr, Timeout: 5 * time.Second}}
}

// reply is a decoded answer: status, the envelope, and data's raw JSON.
type reply struct {
	status  int
	success bool
	message string
	data    json.RawMessage
	fields  map[string]json.RawMessage // the envelope's own fields
}

func (w *worker) do(method, base, path string, q url.Values, header http.Header) reply {
	w.t.Helper()
	u := "http://" + base + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequest(method, u, nil)
	if err != nil {
		w.t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := w.client.Do(req)
	if err != nil {
		w.t.Fatalf("%s %s: %v", method, u, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	r := reply{status: resp.StatusCode}
	if err := json.Unmarshal(body, &r.fields); err != nil {
		w.t.Fatalf("%s %s: answer is not a JSON object: %q", method, u, body)
	}
	json.Unmarshal(r.fields["success"], &r.success)
	json.Unmarshal(r.fields["message"], &r.message)
	r.data = r.fields["data"]
	return r
}

func (w *worker) get(base, path string, q url.Values) reply {
	return w.do(http.MethodGet, base, path, q, nil)
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }
