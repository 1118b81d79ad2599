package server_test

import (
	"bufio"
	"net"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
)

// listenPingPong starts a listener on ip that answers each connection as
// PowerJob's PingPongSocketServer does ("pong" and a line separator), or,
// with answer false, accepts and says nothing. It returns the port.
func listenPingPong(t *testing.T, ip string, answer bool) (port string, stop func()) {
	l, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			if answer {
				c.Write([]byte("pong\n"))
			} else {
				bufio.NewReader(c).ReadString('\n') // until the server gives up
			}
			c.Close()
		}
	})
	stop = func() { l.Close(); wg.Wait() }
	t.Cleanup(stop)
	return strconv.Itoa(l.Addr().(*net.TCPAddr).Port), stop
}

func check(w *worker, n *server.Node, ip, port string) reply {
	return w.get(n.Addr(), "/server/checkConnectivity", url.Values{"targetIp": {ip}, "targetPort": {port}})
}

func TestCheckConnectivityDialsOnlyTheCaller(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n := startNode(t, e, "s1")
	w := newWorker(t)
	port, stop := listenPingPong(t, "127.0.0.1", true)
	if r := check(w, n, "127.0.0.1", port); !r.success || string(r.data) != "true" {
		t.Fatalf("own address, pong: %v %s", r.success, r.data)
	}
	stop()
	if r := check(w, n, "127.0.0.1", port); !r.success || string(r.data) != "false" {
		t.Fatalf("own address, closed: %v %s", r.success, r.data)
	}
	// A port that accepts but is not a PowerJob worker is not "reachable":
	// the check is no port scanner.
	silent, _ := listenPingPong(t, "127.0.0.1", false)
	if r := check(w, n, "127.0.0.1", silent); !r.success || string(r.data) != "false" {
		t.Fatalf("own address, silent listener: %v %s", r.success, r.data)
	}
	other, _ := listenPingPong(t, "127.0.0.2", true)
	for _, ip := range []string{"10.0.0.1", "127.0.0.2", "::1"} {
		if r := check(w, n, ip, other); r.status != 200 || r.success {
			t.Errorf("target %s: %d %v, want refusal", ip, r.status, r.success)
		}
	}
	for _, q := range []url.Values{{"targetIp": {"nope"}, "targetPort": {"22"}}, {"targetIp": {"127.0.0.1"}, "targetPort": {"0"}}, {"targetIp": {"127.0.0.1"}}} {
		if r := w.get(n.Addr(), "/server/checkConnectivity", q); r.status != 400 {
			t.Errorf("%v: %d, want 400", q, r.status)
		}
	}
}

// With CheckOfferedAddresses a node checks any address offered, as
// PowerJob's server does, at a bounded rate.
func TestCheckConnectivityOfOfferedAddressesIsRateLimited(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n := startNode(t, e, "s1", func(c *server.Config) { c.CheckOfferedAddresses = true })
	w := newWorker(t)
	port, _ := listenPingPong(t, "127.0.0.2", true)
	start := time.Now()
	if r := check(w, n, "127.0.0.2", port); !r.success || string(r.data) != "true" {
		t.Fatalf("offered address, pong: %v %s", r.success, r.data)
	}
	allowed := 1
	for range 60 {
		r := check(w, n, "127.0.0.2", port)
		switch {
		case r.success:
			allowed++
		case !strings.Contains(r.message, "too many"):
			t.Fatalf("refusal %q", r.message)
		}
	}
	// At most 20 in any one second.
	most := 20 * (1 + int(time.Since(start).Seconds()))
	if allowed < 20 || allowed > most {
		t.Errorf("%d of 61 checks dialled, want 20 to %d", allowed, most)
	}
}
