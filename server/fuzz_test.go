package server_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
)

var fuzzPaths = []string{
	"/server/assert", "/server/assertV2", "/server/acquire", "/friend/ping", "/server/hello",
	"/server/checkConnectivity", "/admin/apps", "/admin/owners", "/admin/handover", "/nope",
}

var fuzzSeeds = []string{
	"", "appName=orders", "appName=..%2F..%2Fx", "appName=%00", "appName=a&appName=b",
	"appId=1&protocol=HTTP", "appId=-1&protocol=HTTP", "appId=9223372036854775808&protocol=HTTP",
	"appId=1&protocol=HTTP&currentServer=%5B%3A%3A1%5D%3A80", "appId=1&protocol=AKKA",
	"targetIp=127.0.0.1&targetPort=1", "targetIp=::ffff:127.0.0.1&targetPort=65535",
	"%zz", "appName=" + strings.Repeat("%C3%A9", 100), ";;;&&&==", "appName=a+b;c",
	"appId=1&protocol=HTTP&currentServer=fe80::1:10010",
}

// FuzzQueryStrings sends arbitrary query strings to every endpoint (admin
// ones with the right token, so that they write): no answer may be a 5xx
// or anything but the JSON envelope, and nothing may be written outside
// the key prefix.
func FuzzQueryStrings(f *testing.F) {
	for i := range fuzzPaths {
		for _, q := range fuzzSeeds {
			f.Add(uint8(i), q)
		}
	}
	e := testutil.Etcd(f, 1)
	n := startNode(f, e, "s1", func(c *server.Config) { c.AdminToken = "t"; c.Prefix = "/fuzz/baton" })
	n.Registry().Register(context.Background(), "orders")
	h := n.Handler()
	cli := e.Client()

	f.Fuzz(func(t *testing.T, pathIdx uint8, rawQuery string) {
		path := fuzzPaths[int(pathIdx)%len(fuzzPaths)]
		for _, method := range []string{http.MethodGet, http.MethodPost} {
			req := httptest.NewRequest(method, "http://baton"+path, nil)
			req.URL.RawQuery = rawQuery
			req.RemoteAddr = "127.0.0.1:40000"
			req.Header.Set("Authorization", "Bearer t")
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if rec.Code >= 500 {
				t.Fatalf("%s %s?%s: %d %s", method, path, rawQuery, rec.Code, rec.Body)
			}
			var env map[string]json.RawMessage
			if err := json.Unmarshal(rec.Body.Bytes(), &env); err != nil || env["success"] == nil {
				t.Fatalf("%s %s?%s: not the envelope: %q", method, path, rawQuery, rec.Body)
			}
		}
		all, err := cli.Get(context.Background(), "", clientv3.WithFromKey(), clientv3.WithCountOnly())
		if err != nil {
			t.Fatal(err)
		}
		inside, err := cli.Get(context.Background(), "/fuzz/baton/", clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil {
			t.Fatal(err)
		}
		if all.Count != inside.Count {
			t.Fatalf("%d keys outside /fuzz/baton/ after %s?%s", all.Count-inside.Count, path, rawQuery)
		}
	})
}
