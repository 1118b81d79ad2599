package server_test

import (
	"context"
	"crypto/tls"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
	baton "github.com/batonhq/baton/worker"
)

// tlsNode starts a node serving HTTPS with a certificate of pki, pinging
// its peers with a client that trusts pki.
func tlsNode(t *testing.T, pki *testutil.PKI, start func(id string, edit ...func(*server.Config)) *server.Node, id string) *server.Node {
	cert, key := pki.Issue(id)
	pair, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		t.Fatal(err)
	}
	return start(id, func(c *server.Config) {
		c.TLS = &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}
		c.HTTPClient = trusting(t, pki)
	})
}

func trusting(t *testing.T, pki *testutil.PKI) *http.Client {
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pki.Pool, MinVersion: tls.VersionTLS12}}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 5 * time.Second}
}

// A node can serve HTTPS: its records say so, peers ping it over HTTPS
// (an owner pinged by a peer keeps its app), a worker that trusts the CA
// discovers through it, and a worker that trusts another CA gets a clear
// error, as it would from an unreachable server.
func TestNodesAndWorkersSpeakHTTPS(t *testing.T) {
	e := testutil.Etcd(t, 1)
	pki := testutil.NewPKI(t, "wire-ca")
	start := func(id string, edit ...func(*server.Config)) *server.Node { return startNode(t, e, id, edit...) }
	a := tlsNode(t, pki, start, "a")
	b := tlsNode(t, pki, start, "b")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	app, err := a.Registry().Register(ctx, "orders")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Elector().Elect(ctx, app.ID, coord.ProtocolHTTP, ""); err != nil {
		t.Fatal(err)
	}
	var token int64
	testutil.Eventually(t, 5*time.Second, "a to act for the app", func() bool {
		var ok bool
		token, ok = a.Elector().Token(app.ID)
		return ok
	})
	if p := a.Protocols()[coord.ProtocolHTTP]; !p.TLS {
		t.Errorf("a's HTTP transport (its control endpoint) does not say TLS: %+v", p)
	}
	// b must ping a over HTTPS to find it alive.
	addr, err := b.Elector().Elect(ctx, app.ID, coord.ProtocolHTTP, "")
	if err != nil || addr != a.Addr() {
		t.Fatalf("acquire at b: %q, %v; want a's %s", addr, err, a.Addr())
	}
	if now, ok := a.Elector().Token(app.ID); !ok || now != token {
		t.Fatalf("a was deposed (token %d → %d, %v): b's ping over HTTPS failed", token, now, ok)
	}
	// Without trusting the CA a ping fails: the check above was real.
	if _, err := (server.HTTPPinger{}).Ping(ctx, "a", coord.Endpoint{Address: a.Addr(), TLS: true}); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("ping with no trust in the CA: %v", err)
	}

	wcfg := baton.DefaultConfig()
	wcfg.AppName, wcfg.Servers, wcfg.HTTPClient = "orders", []string{"https://" + b.Addr()}, trusting(t, pki)
	d, err := baton.New(wcfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Start(ctx); err != nil {
		t.Fatalf("worker over HTTPS: %v", err)
	}
	defer d.Close()
	if cur, _ := d.Current(); cur.Address != a.Addr() {
		t.Fatalf("worker over HTTPS found %+v, want a", cur)
	}

	wcfg.HTTPClient = trusting(t, testutil.NewPKI(t, "other-ca"))
	wcfg.Tries = 1
	stranger, err := baton.New(wcfg)
	if err != nil {
		t.Fatal(err)
	}
	sctx, scancel := context.WithTimeout(ctx, 2*time.Second) // it keeps trying until its ctx ends
	err = stranger.Start(sctx)
	scancel()
	stranger.Close()
	if !errors.Is(err, baton.ErrNoServer) || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("worker trusting another CA: %v, want ErrNoServer naming the certificate", err)
	}
}
