# The ctest suite. Every test but sfr_header_fresh uses the INSTALLED package under
# CMAKE_INSTALL_PREFIX, so run `cmake --install` before ctest (scripts/test_c.sh does).
set(SFR_INSTALLED_LIB "${CMAKE_INSTALL_PREFIX}/${CMAKE_INSTALL_LIBDIR}/libsfr.so")
set(SFR_C_TEST_TOOL "valgrind" CACHE STRING "How sfr_c_api runs the C program: valgrind, asan or none")
set_property(CACHE SFR_C_TEST_TOOL PROPERTY STRINGS valgrind asan none)

find_program(SFR_CBINDGEN cbindgen HINTS "$ENV{HOME}/.cargo/bin")
add_test(NAME sfr_header_fresh
  COMMAND "${CMAKE_COMMAND}" "-DCBINDGEN=${SFR_CBINDGEN}" "-DSOURCE_DIR=${PROJECT_SOURCE_DIR}"
          "-DOUT=${PROJECT_BINARY_DIR}/sfr.h.fresh" "-DVERSION=${PROJECT_VERSION}"
          -P "${PROJECT_SOURCE_DIR}/cmake/check_header.cmake")

add_test(NAME sfr_installed_runpath
  COMMAND "${CMAKE_COMMAND}" "-DLIB=${SFR_INSTALLED_LIB}" -P "${PROJECT_SOURCE_DIR}/cmake/check_runpath.cmake")

# Each program is a separate CMake project configured and built by ctest itself against the
# installed package, as a user's project would be.
function(sfr_build_and_test name src)
  cmake_parse_arguments(A "" "TIMEOUT" "OPTIONS;COMMAND" ${ARGN})
  set(bin "${PROJECT_BINARY_DIR}/tests/${name}")
  add_test(NAME ${name}
    COMMAND "${CMAKE_CTEST_COMMAND}" --build-and-test "${src}" "${bin}"
            --build-generator "${CMAKE_GENERATOR}" --build-makeprogram "${CMAKE_MAKE_PROGRAM}"
            --build-noclean
            --build-options "-DCMAKE_PREFIX_PATH=${CMAKE_INSTALL_PREFIX}" -DCMAKE_BUILD_TYPE=RelWithDebInfo
                            "-DCMAKE_C_COMPILER=${CMAKE_C_COMPILER}" ${A_OPTIONS}
            --test-command ${A_COMMAND})
  # The installed library must find libtorch by itself.
  set_tests_properties(${name} PROPERTIES ENVIRONMENT "LD_LIBRARY_PATH=" TIMEOUT ${A_TIMEOUT})
endfunction()

set(c_bin "${PROJECT_BINARY_DIR}/tests/sfr_c_api")
if(SFR_C_TEST_TOOL STREQUAL "valgrind")
  find_program(SFR_VALGRIND valgrind REQUIRED)
  # Any memory error, or a definite leak (--errors-for-leak-kinds=definite), fails the test.
  # No suppressions. "Possibly lost" / "still reachable" blocks are not errors: they are the
  # process-lifetime caches and thread-pool stacks of libtorch and glibc.
  set(c_cmd "${SFR_VALGRIND}" --error-exitcode=97 --leak-check=full --show-leak-kinds=definite
            --errors-for-leak-kinds=definite --num-callers=30 "${c_bin}/sfr_c_test")
  set(c_opts "-DSFR_SANITIZE=OFF")
elseif(SFR_C_TEST_TOOL STREQUAL "asan")
  set(c_cmd "${c_bin}/sfr_c_test")
  set(c_opts "-DSFR_SANITIZE=ON")
else()
  set(c_cmd "${c_bin}/sfr_c_test")
  set(c_opts "-DSFR_SANITIZE=OFF")
endif()
sfr_build_and_test(sfr_c_api "${PROJECT_SOURCE_DIR}/tests/c" OPTIONS ${c_opts} COMMAND ${c_cmd} TIMEOUT 1200)

sfr_build_and_test(sfr_cpp_itk "${PROJECT_SOURCE_DIR}/tests/cpp"
  COMMAND "${PROJECT_BINARY_DIR}/tests/sfr_cpp_itk/sfr_itk_test" "${PROJECT_BINARY_DIR}/tests/sfr_cpp_itk/out"
  TIMEOUT 1200)

sfr_build_and_test(sfr_consumer "${PROJECT_SOURCE_DIR}/tests/consumer"
  OPTIONS "-DSFR_EXPECTED_VERSION=${PROJECT_VERSION}"
  COMMAND "${PROJECT_BINARY_DIR}/tests/sfr_consumer/sfr_consumer"
  TIMEOUT 300)
