package server_test

import (
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
)

// envelope decodes a ResultDTO-shaped body.
func envelope(body string) (success *bool, ok bool) {
	var env struct {
		Success *bool `json:"success"`
	}
	if err := json.Unmarshal([]byte(body), &env); err != nil || env.Success == nil {
		return nil, false
	}
	return env.Success, true
}

// Headers over MaxHeaderBytes answer 431 in the envelope, whichever
// header carries the bytes: the Host header too.
func TestBreakOversizedHostHeaderIsRefused(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n := startNode(t, e, "s1")
	for name, req := range map[string]string{
		"Host header":         "GET /server/hello HTTP/1.1\r\nHost: " + strings.Repeat("h", 30<<10) + "\r\n\r\n",
		"many small headers":  "GET /server/hello HTTP/1.1\r\nHost: x\r\n" + strings.Repeat("X-A: "+strings.Repeat("a", 100)+"\r\n", 200) + "\r\n",
		"repeated one header": "GET /server/hello HTTP/1.1\r\nHost: x\r\n" + strings.Repeat("Cookie: "+strings.Repeat("c", 1000)+"\r\n", 20) + "\r\n",
	} {
		status, body := rawRequest(t, n.Addr(), req)
		s, ok := envelope(body)
		if !strings.HasPrefix(status, "431") || !ok || *s {
			t.Errorf("%s over 16 KiB: %s %.200q, want 431 in the envelope", name, status, body)
		}
	}
}

// A TLS node's listener speaks only TLS: a plaintext request gets no
// answer of the API, and a client that connects and never starts the
// handshake is cut at ReadHeader.
func TestBreakTLSListenerServesOnlyTLSAndCutsStalledHandshakes(t *testing.T) {
	e := testutil.Etcd(t, 1)
	pki := testutil.NewPKI(t, "wire-ca")
	n := tlsNode(t, pki, func(id string, edit ...func(*server.Config)) *server.Node {
		return startNode(t, e, id, append(edit, func(c *server.Config) {
			c.HTTPTimeouts.ReadHeader = 300 * time.Millisecond
		})...)
	}, "s1")
	if !n.Protocols()["HTTP"].TLS {
		t.Errorf("records do not say TLS: %+v", n.Protocols())
	}
	c, err := net.DialTimeout("tcp", n.Addr(), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, "GET /server/hello HTTP/1.1\r\nHost: x\r\n\r\n")
	b, _ := io.ReadAll(c)
	c.Close()
	if _, ok := envelope(string(b)); ok || strings.Contains(string(b), "success") {
		t.Errorf("plaintext request to a TLS listener answered by the API: %q", b)
	}
	t.Logf("plaintext answer: %q", b)

	c, err = net.DialTimeout("tcp", n.Addr(), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = io.Copy(io.Discard, c)
	c.Close()
	if took := time.Since(start); err != nil || took > 3*time.Second {
		t.Errorf("stalled handshake not cut (%v after %v)", err, took)
	}
	// A handshake that completes and then sends nothing: cut too.
	tc, err := tls.Dial("tcp", n.Addr(), &tls.Config{RootCAs: pki.Pool})
	if err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	tc.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = io.Copy(io.Discard, tc)
	tc.Close()
	if took := time.Since(start); err != nil || took > 3*time.Second {
		t.Errorf("silent TLS client not cut (%v after %v)", err, took)
	}
}

// checkConnectivity dials only the caller's own IP: another loopback
// address (127.0.0.2 reaches this host too), the unspecified address and
// an IPv4-mapped form of another address are not dialled.
func TestBreakCheckConnectivityRefusesOtherLoopbackForms(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n := startNode(t, e, "s1")
	w := newWorker(t)
	l, err := net.Listen("tcp", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var accepted atomic.Int32
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			c.Write([]byte("pong\n"))
			c.Close()
		}
	}()
	_, port, _ := net.SplitHostPort(l.Addr().String())
	for _, ip := range []string{"127.0.0.2", "0.0.0.0", "::ffff:127.0.0.2", "::", "127.1.2.3"} {
		r := w.get(n.Addr(), "/server/checkConnectivity", url.Values{"targetIp": {ip}, "targetPort": {port}})
		if string(r.data) == "true" {
			t.Errorf("checkConnectivity of %s from 127.0.0.1: %s %s", ip, r.data, r.message)
		}
	}
	if a := accepted.Load(); a != 0 {
		t.Errorf("the node dialled other addresses than the caller's %d times", a)
	}
	// The caller's own address in IPv4-mapped IPv6 form is the caller.
	r := w.get(n.Addr(), "/server/checkConnectivity", url.Values{"targetIp": {"::ffff:127.0.0.1"}, "targetPort": {port}})
	t.Logf("::ffff:127.0.0.1 → %s %q", r.data, r.message)
}

// Every answer of the listener is the envelope: paths the mux would
// redirect (a doubled slash, a dot segment) too.
func TestBreakCleanedPathsAnswerInTheEnvelope(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n := startNode(t, e, "s1", func(c *server.Config) { c.AdminToken = "t" })
	for _, path := range []string{"//server/hello", "/server/../admin/owners", "/admin//owners", "/server/./hello"} {
		status, body := rawRequest(t, n.Addr(), "GET "+path+" HTTP/1.1\r\nHost: x\r\n\r\n")
		if _, ok := envelope(body); !ok {
			t.Errorf("GET %s: %s %.120q, not the envelope", path, status, body)
		}
	}
}
