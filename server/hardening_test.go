package server_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
)

// rawRequest writes req on a new connection to addr and returns the
// status line and body of the answer.
func rawRequest(t *testing.T, addr, req string) (status string, body string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.Status, string(b)
}

// Oversized queries and headers are refused in the envelope, not with Go's
// plain-text answers.
func TestOversizedRequestsAreRefusedInTheEnvelope(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n := startNode(t, e, "s1")
	for name, req := range map[string]string{
		"query":   "GET /server/assert?appName=" + strings.Repeat("a", 9<<10) + " HTTP/1.1\r\nHost: x\r\n\r\n",
		"headers": "GET /server/hello HTTP/1.1\r\nHost: x\r\nX-Pad: " + strings.Repeat("p", 20<<10) + "\r\n\r\n",
	} {
		status, body := rawRequest(t, n.Addr(), req)
		var env struct {
			Success *bool  `json:"success"`
			Message string `json:"message"`
		}
		if err := json.Unmarshal([]byte(body), &env); err != nil || env.Success == nil || *env.Success || !strings.HasPrefix(status, "4") {
			t.Errorf("oversized %s: %s %q, want a 4xx in the envelope", name, status, body)
		}
	}
}

// A request whose body nobody reads (no route takes one) is answered
// without waiting for the body: 10 MB announced, 1 MB sent.
func TestBodiesAreNeverWaitedFor(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n := startNode(t, e, "s1", func(c *server.Config) { c.AdminToken = "t" })
	for _, path := range []string{"/nope", "/admin/apps?appName=x", "/server/hello"} {
		req := fmt.Sprintf("POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nContent-Length: %d\r\n\r\n%s", path, 10<<20, strings.Repeat("b", 1<<20))
		start := time.Now()
		status, body := rawRequest(t, n.Addr(), req)
		if took := time.Since(start); took > 5*time.Second || !strings.Contains(body, `"success"`) {
			t.Errorf("POST %s with a 10 MB body: %s %q after %v", path, status, body, took)
		}
	}
}

// A client that never finishes its headers is cut at ReadHeader, and an
// idle keep-alive connection at Idle.
func TestSlowClientsAreCut(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n := startNode(t, e, "s1", func(c *server.Config) {
		c.HTTPTimeouts.ReadHeader = 300 * time.Millisecond
		c.HTTPTimeouts.Idle = 300 * time.Millisecond
	})
	for name, first := range map[string]string{
		"half a header":          "GET /server/hello HTTP/1.1\r\nHost: x\r\n",
		"idle after one request": "GET /server/hello HTTP/1.1\r\nHost: x\r\n\r\n",
	} {
		c, err := net.Dial("tcp", n.Addr())
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(c, first)
		start := time.Now()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = io.Copy(io.Discard, c) // until the server closes
		c.Close()
		if took := time.Since(start); err != nil || took > 3*time.Second {
			t.Errorf("%s: connection not closed by the server (%v after %v)", name, err, took)
		}
	}
}

// The admin routes do not exist without a token, and refuse a wrong one.
func TestAdminNeedsItsToken(t *testing.T) {
	e := testutil.Etcd(t, 1)
	off := startNode(t, e, "off")
	on := startNode(t, e, "on", func(c *server.Config) { c.AdminToken = "s3cret" })
	w := newWorker(t)
	if r := w.get(off.Addr(), "/admin/owners", nil); r.status != http.StatusNotFound {
		t.Errorf("admin without a token configured: %d, want 404", r.status)
	}
	for _, auth := range []string{"", "Bearer s3cre", "Bearer s3cret2", "Basic s3cret"} {
		h := http.Header{}
		if auth != "" {
			h.Set("Authorization", auth)
		}
		if r := w.do(http.MethodGet, on.Addr(), "/admin/owners", nil, h); r.status != http.StatusUnauthorized && r.status != http.StatusForbidden {
			t.Errorf("admin with %q: %d, want 401 or 403", auth, r.status)
		}
	}
	if r := w.do(http.MethodGet, on.Addr(), "/admin/owners", nil, http.Header{"Authorization": {"Bearer s3cret"}}); r.status != 200 || !r.success {
		t.Errorf("admin with the token: %d %v", r.status, r.success)
	}
}

// The fuzz seeds again, through a real HTTPS listener: same rules.
func TestFuzzSeedsOverTLS(t *testing.T) {
	e := testutil.Etcd(t, 1)
	pki := testutil.NewPKI(t, "fuzz-ca")
	n := tlsNode(t, pki, func(id string, edit ...func(*server.Config)) *server.Node {
		return startNode(t, e, id, append(edit, func(c *server.Config) { c.AdminToken = "t" })...)
	}, "s1")
	n.Registry().Register(context.Background(), "orders")
	cli := trusting(t, pki)
	for _, path := range fuzzPaths {
		for _, q := range fuzzSeeds {
			for _, method := range []string{http.MethodGet, http.MethodPost} {
				req, _ := http.NewRequest(method, "https://"+n.Addr()+path, nil)
				req.URL.RawQuery = q
				req.Header.Set("Authorization", "Bearer t")
				resp, err := cli.Do(req)
				if err != nil {
					t.Fatalf("%s %s?%s: %v", method, path, q, err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				var env map[string]json.RawMessage
				if resp.StatusCode >= 500 || json.Unmarshal(body, &env) != nil || env["success"] == nil {
					t.Fatalf("%s %s?%s: %d %q", method, path, q, resp.StatusCode, body)
				}
			}
		}
	}
}
